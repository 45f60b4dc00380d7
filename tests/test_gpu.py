"""GPU-only checks (skipped with a reason without CUDA); their CPU twins are in test_modes.py."""
import pytest
import torch
from conftest import launch

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CPU twins run in test_modes.py")


@pytest.mark.gpu
@needs_gpu
def test_single_gpu_bf16_run(small_args):
    res = launch(0, *small_args, "train.precision=bf16", "train.epochs=1", timeout=300)
    assert res.returncode == 0, res.stderr
    assert "device=cuda:0" in res.stderr


@pytest.mark.gpu
@needs_gpu
def test_ddp_nccl_one_process_per_gpu(small_args):
    n = torch.cuda.device_count()
    res = launch(n, *small_args, "dist.mode=ddp", "dist.backend=nccl", "train.epochs=1", timeout=300)
    assert res.returncode == 0, res.stderr
    assert "backend=nccl device=cuda" in res.stderr
