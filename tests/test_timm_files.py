"""A file timm's ``train.py`` writes for a timm-native model (with its EMA): converted without naming
the model, evaluated and resumed here (skips where timm is missing)."""
import argparse
import json
from pathlib import Path

import pytest
import torch
import torchvision.models  # noqa: F401  (timm imports it, which sets TORCHINDUCTOR_CACHE_DIR: done here, before the tests' process-state check)
from conftest import PY, launch, run

from ddp_trainer.data.demo import CLASSES

TINY = "test_resnet"


def _write_timm_file(path: Path, timm) -> tuple[torch.nn.Module, torch.nn.Module]:
    """What timm's CheckpointSaver saves after epoch 1 of ``train.py --model test_resnet --model-ema``:
    epoch, arch (the class name), state_dict, optimizer, version 2, args, metric, state_dict_ema."""
    torch.manual_seed(0)
    model = timm.create_model(TINY, num_classes=len(CLASSES))
    ema = timm.create_model(TINY, num_classes=len(CLASSES))
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)  # other weights than the model's, so --ema is seen to choose them
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
                             {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 0.05}])
    args = argparse.Namespace(model=TINY, opt="adamw", lr=1e-3, model_ema=True, model_ema_decay=0.9998)
    torch.save({"epoch": 1, "arch": type(model).__name__.lower(), "state_dict": model.state_dict(),
                "optimizer": opt.state_dict(), "version": 2, "args": args, "metric": 10.0,
                "state_dict_ema": ema.state_dict()}, path)
    return model, ema


def test_a_timm_train_py_file_of_a_timm_model_converts_evaluates_and_resumes(small_args, demo_small, tmp_path):
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[timm]')")
    path = tmp_path / "last.pth.tar"
    _, ema = _write_timm_file(path, timm)

    plain = tmp_path / "ema.pt"
    conv = run([PY, "-m", "ddp_trainer", "convert", str(path), str(plain), "--ema"])
    assert conv.returncode == 0 and f"loads into timm/{TINY}" in conv.stdout, conv.stderr + conv.stdout
    back = timm.create_model(TINY, num_classes=len(CLASSES))
    back.load_state_dict(torch.load(plain, weights_only=True), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ema.state_dict().values()))

    ev = run([PY, "-m", "ddp_trainer", "evaluate", "--checkpoint", str(path), "--ema", "--json",
              f"data.root={demo_small}", f"model.name=timm/{TINY}", "data.image_size=16"])
    assert ev.returncode == 0, ev.stderr
    assert 0.0 <= json.loads(ev.stdout.strip().splitlines()[-1])["val_acc"] <= 1.0

    res = launch(2, *small_args, f"model.name=timm/{TINY}", f"resume={path}", "train.epochs=3",
                 "train.ema_decay=0.9", "optim.name=adamw")
    assert res.returncode == 0, res.stderr
    assert "resume: from" in res.stderr and "resume: the EMA weights of the timm file carried over" in res.stderr
    assert "optimizer state of the timm file carried over" in res.stderr
    state = torch.load(Path(next(a for a in small_args if a.startswith("output_dir=")).split("=", 1)[1])
                       / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["model_ema"] is not None
