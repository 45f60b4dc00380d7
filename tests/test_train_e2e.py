"""End to end: real torchrun runs on CPU (gloo) on small generated folders."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PY, ROOT, TORCHRUN, launch, metrics, our_lines, run
from PIL import Image

from ddp_trainer.data.demo import CLASSES, write_demo_data

REQUIRED = {"epoch", "train_loss", "val_loss", "val_acc", "lr", "images_per_s", "epoch_time_s"}


@pytest.fixture(scope="module")
def trained(demo_small: Path, tmp_path_factory) -> tuple[Path, str]:
    """One 2-process run, 2 epochs, shared by the checks below."""
    out = tmp_path_factory.mktemp("trained") / "run"
    res = launch(2, f"data.root={demo_small}", f"output_dir={out}", "model.name=tiny_cnn_bn", "data.image_size=16",
                 "data.batch_size=8", "data.num_workers=1", "train.epochs=2", "optim.lr=0.01",
                 "train.log_every_steps=5")
    assert res.returncode == 0, res.stderr
    return out, res.stderr


@pytest.mark.stacks  # train and evaluate on the second stack too
def test_two_process_run_trains_and_writes_from_rank_0(trained):
    out, stderr = trained
    assert "launch: DDP world_size=2 nodes=1 backend=gloo device=cpu (torchrun)" in stderr
    assert "global batch 16 = 8 per process x 2 process(es)" in stderr
    assert not [l for l in our_lines(stderr) if l.startswith("[rank 1]")]  # rank 1 logs only warnings
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1]  # one row per epoch: only rank 0 wrote
    for r in rows:
        assert REQUIRED <= r.keys()
        assert 0.0 <= r["val_acc"] <= 1.0 and r["images_per_s"] > 0 and math.isfinite(r["train_loss"])
        assert r["val_count"] == 40
    assert rows[1]["train_loss"] < rows[0]["train_loss"] * 1.5
    assert (out / "config.yaml").read_text().startswith("output_dir:")
    log = (out / "train.log").read_text()
    assert "epoch 1:" in log and "[rank 1]" not in log
    ck = out / "checkpoints"
    assert {p.name for p in ck.iterdir()} >= {"last.pt", "best.pt", "epoch_0000.pt", "epoch_0001.pt"}
    state = torch.load(ck / "last.pt", weights_only=True)
    assert state["class_to_idx"] == {name: i for i, name in enumerate(sorted(CLASSES))}
    assert state["epoch"] == 1 and state["epoch_complete"] and state["world_size"] == 2


@pytest.mark.stacks
def test_validation_metrics_equal_single_and_three_process_evaluation(trained):
    out, _ = trained
    last = metrics(out)[-1]
    ck = out / "checkpoints" / "last.pt"
    single = run([PY, "-m", "ddp_trainer", "evaluate", "--checkpoint", str(ck), "--json"])
    assert single.returncode == 0, single.stderr
    one = json.loads(single.stdout.strip().splitlines()[-1])
    three = run([*TORCHRUN, "--standalone", "--nproc_per_node=3", "-m", "ddp_trainer", "evaluate",
                 "--checkpoint", str(ck), "--json"])
    assert three.returncode == 0, three.stderr
    lines = [l for l in three.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1  # printed by rank 0 only
    tri = json.loads(lines[0])
    for res in (one, tri):
        assert res["count"] == 40
        assert res["val_acc"] == pytest.approx(last["val_acc"], abs=1e-9)
        assert res["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    text = run([PY, "-m", "ddp_trainer", "evaluate", "--checkpoint", str(ck)])
    assert text.stdout.strip().splitlines()[-1].startswith("val_loss=")
    assert text.stdout.strip().splitlines()[-1].endswith("count=40")


def _plain_reference(weights: dict, root: Path, size: int) -> tuple[float, float, int]:
    """A plain single-process loop (no project code in the evaluation path)."""
    import numpy as np
    import torch.nn.functional as F
    from torchvision.transforms.v2 import functional as TF

    from ddp_trainer.models import TinyCNN

    model = TinyCNN(10, batchnorm=True)
    model.load_state_dict(weights)
    model.eval()
    classes = sorted(p.name for p in (root / "val").iterdir())
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for label, c in enumerate(classes):
            for f in sorted((root / "val" / c).iterdir()):
                x = torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1)
                x = TF.center_crop(TF.resize(x, [size], antialias=True), [size, size])
                x = ((x.float() / 255 - mean) / std)[None]
                logits = model(x)
                loss += F.cross_entropy(logits, torch.tensor([label]), reduction="sum").item()
                correct += int(logits.argmax(1).item() == label)
                count += 1
    return loss / count, correct / count, count


def test_exact_validation_41_images_on_3_processes_and_padding_fails(tmp_path: Path):
    root = write_demo_data(tmp_path / "d", train_per_class=2, val_per_class=4, size=16)
    # 41 val images (no world size of 2 or 3 divides it): one more in one class
    src = next((root / "val" / "ring_warm").iterdir())
    shutil.copy(src, root / "val" / "ring_warm" / "extra.png")
    torch.manual_seed(0)
    from ddp_trainer.models import TinyCNN

    w = TinyCNN(10, batchnorm=True)
    with torch.no_grad():  # non-trivial BN statistics
        for m in w.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    weights = tmp_path / "w.pt"
    torch.save(w.state_dict(), weights)
    res = run([*TORCHRUN, "--standalone", "--nproc_per_node=3", str(ROOT / "tests/helpers/exact_eval.py"),
               str(weights), str(root), "tiny_cnn_bn", "16"])
    assert res.returncode == 0, res.stderr
    out = json.loads([l for l in res.stdout.splitlines() if l.startswith("{")][0])
    ref_loss, ref_acc, ref_count = _plain_reference(w.state_dict(), root, 16)
    assert ref_count == 41 and out["count"] == 41 and out["world"] == 3
    assert out["acc"] == pytest.approx(ref_acc, abs=1e-12)
    assert out["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert "counted 42 images but the set holds 41" in out["padded"]
