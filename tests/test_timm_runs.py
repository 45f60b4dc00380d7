"""timm models in real runs: torchrun with 2 processes, evaluate, and ``convert`` to a file that
loads strictly into ``timm.create_model`` (each test skips with a reason where timm is missing)."""
import json
from pathlib import Path

import pytest
import torch
from conftest import PY, launch, metrics, run

from ddp_trainer.checkpoint.weights import load_weights
from ddp_trainer.models import build_model

TINY = "test_resnet.r160_in1k"


def test_two_processes_train_a_timm_model_with_stochastic_depth_then_evaluate_and_convert(small_args, tmp_path):
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[timm]')")
    out = Path(next(a for a in small_args if a.startswith("output_dir=")).split("=", 1)[1])
    res = launch(2, *small_args, f"model.name=timm/{TINY}", "model.drop_path_rate=0.1", "model.drop_rate=0.1",
                 "optim.lr=0.01")
    assert res.returncode == 0, res.stderr
    ck = out / "checkpoints" / "last.pt"
    state = torch.load(ck, weights_only=True)
    n = len(state["class_to_idx"])
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["val_count"] == 4 * n for r in rows)  # 4 val images a class
    assert state["config"]["model"]["drop_path_rate"] == 0.1 and state["model_name"] == f"timm/{TINY}"

    ev = run([PY, "-m", "ddp_trainer", "evaluate", "--checkpoint", str(ck), "--json"])
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert result["val_acc"] == pytest.approx(rows[-1]["val_acc"]) and result["val_loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-5)

    plain = tmp_path / "plain.pt"
    conv = run([PY, "-m", "ddp_trainer", "convert", str(ck), str(plain)])
    assert conv.returncode == 0 and f"loads into timm/{TINY}" in conv.stdout, conv.stderr
    theirs = timm.create_model(TINY, num_classes=n).eval()
    theirs.load_state_dict(torch.load(plain, weights_only=True), strict=True)
    ours = build_model(f"timm/{TINY}", n).eval()
    load_weights(ours, state["model"])
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(theirs(x), ours(x))
