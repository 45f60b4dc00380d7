"""Grid and curve pictures, and the progress bar (only with a terminal)."""
import io
import json
import os
import pty
import subprocess
from pathlib import Path

from conftest import PY, ROOT, child_env, launch, run
from PIL import Image

from ddp_trainer.pictures import grid_size
from ddp_trainer.progress import use_progress_bar


def test_grid_writes_a_png_of_the_expected_size(demo_small: Path, tmp_path: Path):
    out = tmp_path / "g.png"
    res = run([PY, "-m", "ddp_trainer", "grid", "--out", str(out), "--count", "12", f"data.root={demo_small}",
               "data.image_size=16", "data.augment=[flip,random_resized_crop]"])
    assert res.returncode == 0, res.stderr
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.size == grid_size(12, 16) == (8 * 96 + 9 * 4, 2 * (96 + 14) + 3 * 4)
        assert im.mode == "RGB" and len(im.getcolors(maxcolors=1 << 20) or []) > 50  # real pictures, not a blank canvas
    val = run([PY, "-m", "ddp_trainer", "grid", "--split", "val", "--out", str(tmp_path / "v.png"), "--count", "5",
               f"data.root={demo_small}", "data.image_size=16"])
    assert val.returncode == 0 and "5 val images" in val.stdout


def test_plot_writes_curves(tmp_path: Path):
    rows = [{"epoch": e, "train_loss": 2 - e / 2, "val_loss": 2.1 - e / 2, "val_acc": 0.2 * e, "val_acc5": None,
             "lr": 0.1 / (e + 1), "images_per_s": 100 + e} for e in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 3, "tor')
    res = run([PY, "-m", "ddp_trainer", "plot", str(tmp_path)])
    assert res.returncode == 0, res.stderr
    with Image.open(tmp_path / "curves.png") as im:
        assert im.size == (1000, 700)
    missing = run([PY, "-m", "ddp_trainer", "plot", str(tmp_path / "nope")])
    assert missing.returncode == 2 and "metrics.jsonl" in missing.stderr


def test_progress_bar_only_on_rank_0_with_a_terminal():
    assert not use_progress_bar(True, io.StringIO())
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert use_progress_bar(True, tty)
            assert not use_progress_bar(False, tty)
    finally:
        os.close(master)
        os.close(slave)


def test_bar_shows_in_a_terminal_and_not_in_a_pipe(small_args):
    piped = launch(0, *small_args, "train.epochs=1", "train.log_every_steps=2", timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stderr and "samples, loss=" in piped.stderr  # plain log lines, no bar
    master, slave = pty.openpty()
    proc = subprocess.Popen([PY, str(ROOT / "launch.py"), *small_args, "train.epochs=1", "overwrite=true",
                             "resume=none"], stdout=subprocess.DEVNULL, stderr=slave, env=child_env(), cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(60) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "epoch 0:" in text and "img/s" in text and "\r" in text  # a tqdm bar redrawn in place


def test_tensorboard_scalars_or_one_warning(small_args, tmp_path: Path):
    import importlib.util

    res = launch(0, *small_args, "train.epochs=1", "log.tensorboard=true", timeout=120)
    if importlib.util.find_spec("tensorboard") is None:
        assert res.returncode == 0, res.stderr  # like W&B or MLflow missing: one warning, the run goes on
        assert "pip install tensorboard" in res.stderr and "log.tensorboard=false" in res.stderr
    else:
        assert res.returncode == 0, res.stderr
        assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
