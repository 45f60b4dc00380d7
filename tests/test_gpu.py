"""GPU-only checks (skipped with a reason without CUDA); their CPU twins are in test_modes.py."""
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, child_env, launch

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


# -- scripts/gpu_check.sh on a machine without a GPU (CI): it must say so, never pass silently --------

GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"


@pytest.mark.stacks
def test_gpu_check_skips_cleanly_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: scripts/gpu_check.sh runs its checks")
    res = subprocess.run(["bash", str(GPU_CHECK), str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=120, env=child_env(PYTHON=sys.executable, PATH=f"{tmp_path}:/usr/bin:/bin"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "SKIP gpu_check: no CUDA GPU visible (nvidia-smi lists none, " \
                                 "torch.cuda.device_count() == 0)"
    assert (tmp_path / "out" / "summary.txt").read_text().strip() == res.stdout.strip()


def test_gpu_check_fails_when_its_python_has_no_torch(tmp_path):
    # was: 'python' without torch printed "SKIP ... no CUDA GPU visible" and exited 0 on the GPU machine
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    res = subprocess.run(["bash", str(GPU_CHECK), str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=60, env=child_env(PYTHON=str(fake)))
    assert res.returncode == 1
    assert res.stdout.startswith(f"FAIL preflight: {fake} cannot import torch (ModuleNotFoundError")


@pytest.mark.stacks
def test_gpu_check_python_parts_run_on_the_cpu(tmp_path):
    """The in-process checks as a smoke test on the CPU (their figures mean nothing here): the file
    imports and runs on this stack."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_checks.py"), "writers", str(tmp_path),
                          "--device", "cpu"], capture_output=True, text=True, timeout=120, env=child_env())
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("RESULT ") and "both files CPU-only" in res.stdout
