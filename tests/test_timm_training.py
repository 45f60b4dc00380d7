"""timm models with the rest of training: the EMA (validated, saved and evaluated), every sampler
family for an epoch, and ``evaluate --tta flip`` against the mean of the plain and mirrored logits
of timm's own model, computed here (each test skips with a reason where timm is missing)."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.models  # noqa: F401  (timm imports it, which sets TORCHINDUCTOR_CACHE_DIR: done here, before the tests' process-state check)
from conftest import PY, launch, metrics, run

from ddp_trainer import config
from ddp_trainer.data.datasets import FolderDataset, eval_transform, scan_splits

TINY = "test_resnet.r160_in1k"
NO_TIMM = "timm is not installed (pip install -e '.[timm]')"


def _out(small_args) -> Path:
    return Path(next(a for a in small_args if a.startswith("output_dir=")).split("=", 1)[1])


def _evaluate(ck: Path, *extra: str) -> dict:
    ev = run([PY, "-m", "ddp_trainer", "evaluate", "--checkpoint", str(ck), "--json", *extra])
    assert ev.returncode == 0, ev.stderr
    return json.loads(ev.stdout.strip().splitlines()[-1])


def test_the_ema_of_a_timm_model_is_validated_saved_and_evaluated_and_flip_tta_is_timm_s_mean(small_args, tmp_path):
    timm = pytest.importorskip("timm", reason=NO_TIMM)
    out = _out(small_args)
    res = launch(2, *small_args, f"model.name=timm/{TINY}", "train.ema_decay=0.9",
                 "checkpoint.monitor=val_acc_ema", "checkpoint.mode=max", "optim.lr=0.01")
    assert res.returncode == 0, res.stderr
    ck = out / "checkpoints" / "last.pt"
    state = torch.load(ck, weights_only=True)
    rows = metrics(out)
    assert all("val_loss_ema" in r for r in rows) and rows[-1]["val_loss_ema"] != rows[-1]["val_loss"]
    assert state["model_ema"]["n_averaged"] == state["step"] > 0
    assert _evaluate(ck, "--ema", "--tta", "none")["val_loss"] == pytest.approx(rows[-1]["val_loss_ema"], rel=1e-6)

    # the EMA weights in timm's own model, on the validation images, plain and mirrored, by hand
    plain = tmp_path / "ema.pt"
    conv = run([PY, "-m", "ddp_trainer", "convert", str(ck), str(plain), "--ema"])
    assert conv.returncode == 0, conv.stderr
    n = len(state["class_to_idx"])
    theirs = timm.create_model(TINY, num_classes=n).eval()
    theirs.load_state_dict(torch.load(plain, weights_only=True), strict=True)
    cfg = config.build(state["config"])
    val = scan_splits(cfg.data, Path(cfg.data.root)).val
    ds = FolderDataset(val, eval_transform(cfg.data))
    images = torch.stack([ds[i][0] for i in range(len(ds))]).float() / 255
    labels = torch.tensor([ds[i][1] for i in range(len(ds))])
    mean, std = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    x = (images - mean) / std
    with torch.no_grad():
        logits_plain, logits_flip = theirs(x), theirs(x.flip(-1))
    both = (logits_plain + logits_flip) / 2
    flip = _evaluate(ck, "--ema", "--tta", "flip")
    assert flip["count"] == len(ds) == 4 * n
    assert flip["val_loss"] == pytest.approx(F.cross_entropy(both, labels).item(), rel=1e-5)
    assert flip["val_acc"] == pytest.approx((both.argmax(1) == labels).float().mean().item())
    none = _evaluate(ck, "--ema", "--tta", "none")
    assert none["val_loss"] == pytest.approx(F.cross_entropy(logits_plain, labels).item(), rel=1e-5)
    assert none["val_loss"] != pytest.approx(flip["val_loss"], rel=1e-6)  # the mirror changed the logits


@pytest.mark.parametrize("sampler", ["plan", "distributed", "repeated_augment", "class_balanced"])
def test_each_sampler_family_trains_a_timm_model_for_an_epoch_under_two_processes(sampler, small_args):
    pytest.importorskip("timm", reason=NO_TIMM)
    out = _out(small_args)
    args = [a for a in small_args if not a.startswith("train.epochs=")]
    res = launch(2, *args, f"model.name=timm/{TINY}", f"data.sampler={sampler}", "train.epochs=1",
                 "model.drop_path_rate=0.1", "optim.lr=0.01")
    assert res.returncode == 0, res.stderr
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    rows = metrics(out)
    n = len(state["class_to_idx"])
    assert [r["epoch"] for r in rows] == [0] and rows[0]["val_count"] == 4 * n
    assert torch.isfinite(torch.tensor(rows[0]["train_loss"]))
    assert state["config"]["data"]["sampler"] == sampler and state["model_name"] == f"timm/{TINY}"
    assert state["step"] > 0
