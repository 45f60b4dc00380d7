"""Checkpoint format, crash-safe writes, retention, foreign formats and the checkpoint commands."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from conftest import PY, launch, metrics, our_lines, run
from torch import nn

from ddp_trainer.checkpoint.reader import read_checkpoint
from ddp_trainer.checkpoint.weights import load_weights
from ddp_trainer.checkpoint.writer import CheckpointWriter, atomic_save
from ddp_trainer.errors import CheckpointError
from ddp_trainer.models import TinyCNN


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyCNN(10, batchnorm=True)


@pytest.fixture(scope="module")
def ddp_group(tmp_path_factory):
    """A real one-process gloo group, so that DDP wrappers can be built in this process."""
    store = tmp_path_factory.mktemp("store") / "f"
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


def wrappers():
    yield "plain", lambda m: m
    yield "dataparallel", lambda m: nn.DataParallel(m)
    yield "ddp", lambda m: nn.parallel.DistributedDataParallel(m)


def foreign_files(tmp_path: Path, src: nn.Module) -> dict[str, Path]:
    sd = src.state_dict()
    opt = torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9)
    files = {
        "classic_dp": ({"net": {f"module.{k}": v for k, v in sd.items()}, "optimizer": opt.state_dict(), "epoch": 4}),
        "plain": sd,
        "plain_module": {f"module.{k}": v for k, v in sd.items()},
        "compiled": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "compiled_ddp": {f"module._orig_mod.{k}": v for k, v in sd.items()},
        "model_state_dict": {"model_state_dict": sd, "epoch": 2},
    }
    out = {}
    for name, obj in files.items():
        out[name] = tmp_path / f"{name}.pt"
        torch.save(obj, out[name])
    return out


def test_every_foreign_format_loads_into_every_wrapper(tmp_path: Path, ddp_group):
    src = model(1)
    for name, path in foreign_files(tmp_path, src).items():
        loaded = read_checkpoint(path)
        for wname, wrap in wrappers():
            target = wrap(model(2))
            load_weights(target, loaded.model)
            inner = target.module if wname != "plain" else target
            for k, v in src.state_dict().items():
                assert torch.equal(inner.state_dict()[k], v), (name, wname, k)
    classic = read_checkpoint(tmp_path / "classic_dp.pt")
    assert classic.kind == "classic" and classic.start_epoch == 5 and classic.renamed == len(src.state_dict())
    assert classic.optimizer is not None


def test_wrong_model_is_refused_with_what_differs(tmp_path: Path):
    torch.save(TinyCNN(3).state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other shapes"):
        load_weights(model(), read_checkpoint(tmp_path / "other.pt").model)


def test_pickled_model_needs_trust(tmp_path: Path):
    m = model(3)
    torch.save(nn.DataParallel(m), tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        read_checkpoint(tmp_path / "whole.pt")
    loaded = read_checkpoint(tmp_path / "whole.pt", trust=True)
    assert loaded.kind == "pickled_model"
    assert torch.equal(loaded.model["fc.weight"], m.state_dict()["fc.weight"])


def test_corrupt_and_missing_files(tmp_path: Path):
    p = tmp_path / "c.pt"
    torch.save(model().state_dict(), p)
    p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(p)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "none.pt")


def test_writer_links_last_and_best_and_keeps_the_newest(tmp_path: Path):
    w = CheckpointWriter(tmp_path / "ck", keep_last=2)
    for e in range(4):
        w.save({"e": torch.tensor(e)}, epoch_file=e, best=e == 1)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["best.pt", "epoch_0002.pt", "epoch_0003.pt", "last.pt"]
    assert torch.load(tmp_path / "ck" / "last.pt")["e"] == 3
    assert torch.load(tmp_path / "ck" / "best.pt")["e"] == 1  # kept although its epoch file is gone
    w.save({"e": torch.tensor(9)})  # mid-epoch: last.pt only
    assert torch.load(tmp_path / "ck" / "last.pt")["e"] == 9
    assert torch.load(tmp_path / "ck" / "epoch_0003.pt")["e"] == 3


def test_failed_write_keeps_the_previous_file(tmp_path: Path):
    path = tmp_path / "last.pt"
    atomic_save({"v": torch.tensor(1)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_save({"v": torch.zeros(1000), "x": Boom()}, path)
    assert torch.load(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# -- commands and run-level behaviour on a real (1-process, 1-epoch) checkpoint ------------------------

@pytest.fixture(scope="module")
def run_dir(demo_small: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "run"
    res = launch(0, f"data.root={demo_small}", f"output_dir={out}", "model.name=tiny_cnn_bn", "data.image_size=16",
                 "data.batch_size=8", "data.num_workers=0", "train.epochs=1", timeout=120)
    assert res.returncode == 0, res.stderr
    return out


def test_checkpoint_loads_into_plain_torchvision_style_model(run_dir: Path):
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    m = TinyCNN(10, batchnorm=True)
    m.load_state_dict(state["model"])  # canonical keys: no wrapper prefixes
    for key in ("format_version", "optimizer", "scheduler", "epoch", "position", "step", "best", "class_to_idx",
                "model_name", "config", "world_size", "torch_version", "rng"):
        assert key in state


def test_inspect(run_dir: Path):
    res = run([PY, "-m", "ddp_trainer", "inspect", str(run_dir / "checkpoints" / "last.pt"), "--json"])
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["format"] == "ddp_trainer" and info["epoch"] == 0 and info["model"] == "tiny_cnn_bn"
    assert info["resumes_at_epoch"] == 1 and len(info["classes"]) == 10 and info["world_size"] == 1
    text = run([PY, "-m", "ddp_trainer", "inspect", str(run_dir / "checkpoints" / "last.pt")])
    assert "epoch: 0" in text.stdout and "tiny_cnn_bn" in text.stdout


def test_convert_with_and_without_prefix(run_dir: Path, tmp_path: Path):
    src = run_dir / "checkpoints" / "last.pt"
    res = run([PY, "-m", "ddp_trainer", "convert", str(src), str(tmp_path / "dp.pt"), "--prefix", "module."])
    assert res.returncode == 0, res.stderr
    dp = torch.load(tmp_path / "dp.pt", weights_only=True)
    assert all(k.startswith("module.") for k in dp)
    nn.DataParallel(TinyCNN(10, batchnorm=True)).load_state_dict(dp)
    res = run([PY, "-m", "ddp_trainer", "convert", str(tmp_path / "dp.pt"), str(tmp_path / "plain.pt")])
    assert res.returncode == 0
    TinyCNN(10, batchnorm=True).load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=True))
    same = run([PY, "-m", "ddp_trainer", "convert", str(src), str(src)])
    assert same.returncode == 2 and "overwrite its input" in same.stderr


def test_predict_names_classes(run_dir: Path, demo_small: Path):
    img = sorted((demo_small / "val" / "cross_warm").iterdir())[0]
    res = run([PY, "-m", "ddp_trainer", "predict", "--checkpoint", str(run_dir / "checkpoints" / "last.pt"),
               str(img), "--top", "2"])
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert line.startswith(str(img)) and len(line.split(",")) == 2
    from ddp_trainer.data.demo import CLASSES

    assert any(c in line for c in CLASSES)


def test_resume_path_with_other_classes_is_refused(run_dir: Path, demo_small: Path, tmp_path: Path):
    data = tmp_path / "d"
    shutil.copytree(demo_small, data)
    for split in ("train", "val"):
        shutil.rmtree(data / split / "ring_cool")
    res = launch(0, f"data.root={data}", f"output_dir={tmp_path / 'o'}", "model.name=tiny_cnn_bn",
                 "data.image_size=16", f"resume={run_dir / 'checkpoints' / 'last.pt'}", timeout=120)
    assert res.returncode == 2
    (err,) = [l for l in our_lines(res.stderr) if "error:" in l]
    assert "other classes" in err and "10 classes, data has 9" in err and "model.init_from" in err


def test_init_from_with_other_class_count_keeps_a_new_head(run_dir: Path, demo_small: Path, tmp_path: Path):
    data = tmp_path / "d"
    shutil.copytree(demo_small, data)
    for split in ("train", "val"):
        for c in list((data / split).iterdir())[:7]:
            shutil.rmtree(c)
    out = tmp_path / "o"
    res = launch(0, f"data.root={data}", f"output_dir={out}", "model.name=tiny_cnn_bn", "data.image_size=16",
                 "data.batch_size=8", "data.num_workers=0", "train.epochs=1", "optim.lr=1e-9",
                 f"model.init_from={run_dir / 'checkpoints' / 'last.pt'}", timeout=120)
    assert res.returncode == 0, res.stderr
    assert "classifier head fc. left new" in res.stderr
    new = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    old = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert new["fc.weight"].shape[0] == 3
    assert torch.allclose(new["features.0.weight"], old["features.0.weight"], atol=1e-6)  # body carried over


def test_classic_checkpoint_resumes_at_next_epoch_and_optimizer_mismatch_is_skipped(
        run_dir: Path, demo_small: Path, tmp_path: Path):
    m = TinyCNN(10, batchnorm=True)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    m.load_state_dict(state["model"])
    sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save({"net": nn.DataParallel(m).state_dict(), "optimizer": sgd.state_dict(), "epoch": 0},
               weights / "checkpoint")
    out = tmp_path / "o"
    res = launch(0, f"data.root={demo_small}", f"output_dir={out}", "model.name=tiny_cnn_bn", "data.image_size=16",
                 "data.batch_size=8", "data.num_workers=0", "train.epochs=2", f"resume={weights / 'checkpoint'}",
                 timeout=120)
    assert res.returncode == 0, res.stderr
    assert "classic format), epoch 1" in res.stderr
    assert "optimizer state of the classic file skipped (it is sgd, optim.name=adamw)" in res.stderr
    assert [r["epoch"] for r in metrics(out)] == [1]


# -- asynchronous saves --------------------------------------------------------------------------------

def test_async_writer_snapshots_and_reports_a_failed_write(tmp_path: Path):
    from ddp_trainer.checkpoint.writer import AsyncCheckpointWriter

    w = AsyncCheckpointWriter(tmp_path / "ck", keep_last=2)
    live = torch.zeros(3)
    w.save({"v": live}, epoch_file=0)
    live += 7  # training goes on changing the live tensor while the write is in flight
    w.close()
    assert torch.equal(torch.load(tmp_path / "ck" / "last.pt")["v"], torch.zeros(3))

    class Boom:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    w.save({"v": torch.ones(2), "x": Boom()})  # returns at once; the failure happens in the thread
    with pytest.raises(CheckpointError) as info:
        w.close()
    assert "last.pt" in info.value.message and "intact" in info.value.message
    assert torch.equal(torch.load(tmp_path / "ck" / "last.pt")["v"], torch.zeros(3))
    assert not list((tmp_path / "ck").glob(".*.tmp-*"))


def test_async_save_into_a_folder_made_unwritable_fails_the_run(require_root, demo_small: Path, tmp_path: Path):
    import subprocess
    import time

    from test_resume import start, wait_for

    out = tmp_path / "run"
    ck = out / "checkpoints"
    args = [f"data.root={demo_small}", f"output_dir={out}", "model.name=slow_model:build", "data.image_size=16",
            "data.batch_size=8", "data.num_workers=1", "train.epochs=3", "checkpoint.every_steps=2",
            "train.log_every_steps=1"]
    proc = start(2, args)
    wait_for(lambda: (ck / "last.pt").exists(), proc=proc)
    time.sleep(0.3)
    before = torch.load(ck / "last.pt", weights_only=True)
    subprocess.run(["mount", "--bind", str(ck), str(ck)], check=True)
    try:
        # The kernel refuses a read-only remount (EBUSY) while a file is open for writing through
        # the new bind mount, which the saver may be doing at that instant: try again until the
        # write in flight has closed.
        for _ in range(200):
            if subprocess.run(["mount", "-o", "remount,ro,bind", str(ck)], capture_output=True).returncode == 0:
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"could not make {ck} read-only for 4 s")
        rc = proc.wait(120)
        err = proc.stderr.read()
    finally:
        if subprocess.run(["umount", str(ck)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(ck)], check=False)
    assert rc != 0
    lines = [l for l in err.splitlines() if "error:" in l and l.startswith("[rank")]
    assert len(lines) == 1 and "checkpoint write to" in lines[0] and str(ck) in lines[0], err[-3000:]
    after = torch.load(ck / "last.pt", weights_only=True)  # the previous last.pt, intact
    assert after["step"] >= before["step"]
