"""Config values and data that were accepted and wrong: refused with a line naming the key or the fix."""
import os
import socket
import time
from pathlib import Path

import pytest
from conftest import PY, ROOT, child_env, launch, our_lines, run

from ddp_trainer.config import load
from ddp_trainer.errors import ConfigError


@pytest.mark.parametrize("override, names", [
    ("sched.gamma=-1", "sched.gamma: bad value -1.0; use a factor in (0, 1]"),  # was: a negative lr, rc 0
    ("sched.min_lr=-1", "sched.min_lr: bad value -1.0"),  # was: lr -0.99, loss 159572
    ("sched.min_lr=0.5", "sched.min_lr: bad value 0.5; use a floor of at most optim.lr=0.002"),
    ("data.mixup_alpha=1e-300", "data.mixup_alpha: bad value 1e-300; use 0 (off) or a number from 0.001"),
    ("data.cutmix_alpha=1e-9", "data.cutmix_alpha: bad value 1e-09"),
    ("optim.lr=1e300", "optim.lr: bad value 1e+300; use a positive, finite learning rate (at most 3e+38)"),  # was: raw overflow
    ("debug.steps_per_epoch=0", "debug.steps_per_epoch: bad value 0; use at least 1"),  # was: ran nothing
    ("debug.steps_per_epoch=-3", "debug.steps_per_epoch: bad value -3"),  # was: a whole epoch
    ("debug.epochs=0", "debug.epochs: bad value 0; use at least 1"),  # was: blamed train.epochs
])
def test_values_that_were_accepted_and_wrong_are_refused(override, names):
    with pytest.raises(ConfigError) as info:
        load(None, [override])
    assert info.value.message.startswith(names), info.value.message


def test_one_class_is_refused_and_one_image_per_class_says_what_would_work(tmp_path: Path):
    from ddp_trainer.data.demo import write_demo_data

    single = write_demo_data(tmp_path / "single", train_per_class=6, val_per_class=2, size=16)
    for split in ("train", "val"):
        for d in sorted((single / split).iterdir())[1:]:
            __import__("shutil").rmtree(d)
    res = launch(0, f"data.root={single}", f"output_dir={tmp_path / 'r1'}", "model.name=tiny_cnn", "data.image_size=16",
                 "data.num_workers=0", timeout=120)
    assert res.returncode == 2, res.stderr  # was: trained to val_acc 1.0
    assert "the data has 1 class; a classifier needs 2 or more class folders" in res.stderr
    few = tmp_path / "few"
    for k in range(30):
        (few / "train" / f"c{k:02d}").mkdir(parents=True)
        (few / "train" / f"c{k:02d}" / "a.png").write_bytes((single / "train").joinpath(
            next((single / "train").iterdir()).name, "00000.png").read_bytes())
    res = run([PY, "-m", "ddp_trainer", "check", f"data.root={few}", "data.val_fraction=0.5", "model.name=tiny_cnn"],
              timeout=120)
    assert res.returncode == 2
    # was: "raise it or add a val/ folder" for every data.val_fraction
    assert "(its largest class has 1 image(s)); no share can be held out without taking a class's only image: " \
           "add a val/ folder" in res.stderr


def test_a_rank_that_never_joins_is_named_as_a_wait(small_args, tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = child_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port))
    t0 = time.monotonic()
    res = run([PY, str(ROOT / "launch.py"), *small_args, "dist.init_timeout_s=3"], env=env, timeout=120)
    assert res.returncode == 1 and time.monotonic() - t0 < 60
    (err,) = [l for l in our_lines(res.stderr) if "error:" in l]
    # was: "lost contact with another rank ... 1/2 clients joined"
    assert "gave up after waiting 3 s for the other ranks to join the process group (world size 2, " \
           f"127.0.0.1:{port}) (dist.init_timeout_s=3)" in err, err


class _Calls:
    def __reduce__(self):
        return (os.system, ("echo this ran",))


def test_a_pickle_that_calls_os_system_is_named_as_code_not_as_damage(tmp_path: Path):
    import torch

    from ddp_trainer.checkpoint.reader import read_checkpoint
    from ddp_trainer.errors import CheckpointError

    path = tmp_path / "sneaky.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": _Calls()}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    # was: "is corrupt or truncated (Weights only load failed ...)"
    assert info.value.message.startswith(f"checkpoint '{path}' holds the Python object posix.system, which is code")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])  # damage stays damage
    with pytest.raises(CheckpointError, match="is corrupt or truncated"):
        read_checkpoint(tmp_path / "cut.pt")
