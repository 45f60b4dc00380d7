"""A timm run with every timm piece on (drop path, LAMB, BCE with its threshold, a timm RandAugment
string, CutMix) resumes bitwise from a mid-epoch checkpoint, as a SIGKILL right after that save
leaves it (skips where timm is missing)."""
import pytest
import torch
import torchvision.models  # noqa: F401  (timm imports it, which sets TORCHINDUCTOR_CACHE_DIR: done here, before the tests' process-state check)
from conftest import kept_mid_epoch, launch


def test_a_timm_run_with_everything_on_resumes_bitwise_mid_epoch(small_args, reference_run, tmp_path):
    pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[timm]')")
    args = [a for a in small_args if not a.startswith("output_dir=")] + [
        "model.name=timm/test_resnet.r160_in1k", "model.drop_path_rate=0.1", "optim.name=lamb", "optim.lr=0.01",
        "train.loss=bce", "train.bce_target_threshold=0.2", "data.augment=[flip,rand-m7-mstd0.5-inc1]",
        "data.cutmix_alpha=1.0", "checkpoint.every_steps=2"]
    reference = reference_run(2, args)
    out = tmp_path / "resumed"
    state = kept_mid_epoch(reference.kept, out)
    res = launch(2, *args, f"output_dir={out}")
    assert res.returncode == 0, res.stderr
    assert f"{state['position']} samples into the epoch" in res.stderr
    a = torch.load(reference.path / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(), b["optimizer"]["state"][0].values()))
