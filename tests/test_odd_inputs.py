"""Odd inputs that used to pass silently or crash: a training set changed under a mid-epoch resume,
symlink loops, 16-bit PNGs, and config edges (empty output_dir, non-finite numbers, duplicate YAML
keys, non-UTF-8 files, out-of-range seed and image size)."""
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PY, ROOT, kill_when, metrics, run
from PIL import Image
from test_resume import env, mid_epoch_checkpoint, resume_args, start

from ddp_trainer import config
from ddp_trainer.data.folder_index import scan
from ddp_trainer.data.images import load_rgb
from ddp_trainer.errors import ConfigError


@pytest.mark.slow
def test_mid_epoch_resume_on_a_changed_training_set_restarts_the_epoch_or_refuses(demo_small: Path, tmp_path: Path):
    data = tmp_path / "data"
    shutil.copytree(demo_small, data)
    out = tmp_path / "run"
    args = resume_args(data, out)
    kill_when(start(2, args), mid_epoch_checkpoint(out / "checkpoints"))
    for cls in sorted((data / "train").iterdir())[:8]:  # 120 -> 56 images: the saved position is past the end
        for f in sorted(cls.iterdir())[4:]:
            f.unlink()
    refused = run([PY, str(ROOT / "launch.py"), *args, "checkpoint.on_data_change=error"], env=env())
    assert refused.returncode == 2, refused.stderr
    assert "the training set changed since the checkpoint (120 -> 56 images" in refused.stderr
    res = run([PY, str(ROOT / "launch.py"), *args], env=env())
    assert res.returncode == 0, res.stderr  # was: ValueError: start 64 outside epoch of 45 samples
    assert "restarts its order from the beginning" in res.stderr
    assert [r["epoch"] for r in metrics(out)] == [0, 1]


def test_a_symlink_loop_is_walked_once(demo_small: Path, tmp_path: Path, caplog):
    data = tmp_path / "train"
    shutil.copytree(demo_small / "train", data)
    os.symlink(".", data / "circle_cool" / "loop")  # ln -s . train/circle_cool/loop
    (data / "ring_cool" / "sub").mkdir()
    shutil.move(str(data / "ring_cool" / "00000.png"), data / "ring_cool" / "sub" / "00000.png")
    os.symlink("..", data / "ring_cool" / "sub" / "up")  # a loop one level down
    logging.getLogger("ddp_trainer").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="ddp_trainer"):
            index = scan(data)
    finally:
        logging.getLogger("ddp_trainer").propagate = False
    assert len(index) == len(scan(demo_small / "train")) == 120  # was 704 with the loop
    warned = [r.getMessage() for r in caplog.records]
    assert any("circle_cool/loop" in m and "already scanned" in m for m in warned)
    assert any("ring_cool/sub/up" in m for m in warned)
    assert sum(1 for rel, _ in index.samples if rel.startswith("ring_cool/")) == 12


@pytest.mark.usefixtures("each_decoder")
def test_16_bit_pngs_are_scaled_to_8_bits(tmp_path: Path):
    values = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")  # a 16-bit grayscale PNG
    img = load_rgb(str(tmp_path / "g16.png"))
    assert img.dtype == torch.uint8 and img.shape == (3, 1, 4)
    assert img[0, 0].tolist() == [0, 128, 255, 3]  # value / 257, not the low byte (which gave 0, 0, 255, 232)
    Image.new("RGB", (4, 1), (9, 9, 9)).save(tmp_path / "rgb8.png")
    batch = torch.stack([img, load_rgb(str(tmp_path / "rgb8.png"))])  # 8- and 16-bit files in one batch
    assert batch.dtype == torch.uint8


@pytest.mark.parametrize("override, message", [
    ("output_dir=", "output_dir: bad value ''; name a folder"),
    ("optim.lr=.inf", "optim.lr: bad value inf; use a finite number"),
    ("data.mean=[0,0,nan]", "data.mean[2]: bad value 'nan'; use a finite number"),
    ("seed=99999999999999999999", "seed: bad value 99999999999999999999"),
    ("data.image_size=100000", "data.image_size: bad value 100000; use 8 to 8192"),
])
def test_config_values_that_cannot_train_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        config.load(None, [override])
    assert message in err.value.message


def test_duplicate_keys_and_non_utf8_config_files_are_named(tmp_path: Path):
    (tmp_path / "dup.yaml").write_text("train:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml': key 'epochs' appears twice \(lines 2 and 3\)"):
        config.load(tmp_path / "dup.yaml")
    (tmp_path / "latin1.yaml").write_bytes("train:\n  epochs: 3  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml' is not UTF-8 text"):
        config.load(tmp_path / "latin1.yaml")


def _with_undecodable_names(demo_small: Path, tmp_path: Path) -> tuple[Path, bytes]:
    """demo_small plus, in the first class, a good image and a broken one whose names are not UTF-8."""
    data = tmp_path / "data"
    shutil.copytree(demo_small, data)
    cls = os.fsencode(sorted((data / "train").iterdir())[0])
    good = sorted(os.listdir(cls))[0]
    shutil.copy(os.path.join(cls, good), os.path.join(cls, b"caf\xe9 photo.png"))  # Latin-1 name
    broken = os.path.join(cls, b"broken\xfe.jpg")
    with open(broken, "wb") as f:
        f.write(b"not an image")
    return data, broken


def test_file_names_that_are_not_utf8_train_and_are_named_with_escapes(demo_small: Path, tmp_path: Path):
    data, broken = _with_undecodable_names(demo_small, tmp_path)
    shown = broken.decode("utf-8", "backslashreplace")  # .../broken\xfe.jpg
    base = [PY, str(ROOT / "launch.py"), f"data.root={data}", "model.name=tiny_cnn", "data.image_size=16",
            "data.num_workers=0", "train.epochs=1"]
    skipped = run([*base, f"output_dir={tmp_path / 'a'}", "data.bad_images=skip", "data.cache=decoded",
                   f"data.cache_dir={tmp_path / 'cache'}"], env=env())
    assert skipped.returncode == 0, skipped.stderr  # was: UnicodeEncodeError / "--- Logging error ---"
    assert "Logging error" not in skipped.stderr and "Traceback" not in skipped.stderr
    assert "skipped 1 unreadable train image(s)" in skipped.stderr and "broken\\xfe.jpg" in skipped.stderr
    assert "broken\\xfe.jpg" in (tmp_path / "a" / "train.log").read_text()
    stopped = run([*base, f"output_dir={tmp_path / 'b'}", "data.cache=decoded",
                   f"data.cache_dir={tmp_path / 'cache'}"], env=env())
    assert stopped.returncode == 2, stopped.stderr
    (line,) = [l for l in stopped.stderr.splitlines() if "error:" in l]
    assert f"cannot decode image '{shown}'" in line and "data.bad_images=skip" in line


def test_a_loss_that_becomes_nan_stops_every_rank_and_keeps_the_last_good_checkpoint(demo_small: Path,
                                                                                    tmp_path: Path):
    out = tmp_path / "run"
    args = [f"data.root={demo_small}", f"output_dir={out}", "model.name=tiny_cnn", "data.image_size=16",
            "data.batch_size=8", "data.num_workers=0", "train.epochs=2", "optim.name=sgd", "optim.lr=1e7",
            "checkpoint.every_steps=1", "train.log_every_steps=1000"]
    res = run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"),
               *args], env=env())
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if "became nan/inf" in l]
    assert len(lines) == 1, res.stderr  # one line, from rank 0
    step = int(lines[0].split("at step ")[1].split()[0])
    assert step >= 2 and "the last good checkpoint stays" in lines[0], lines[0]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == step - 1  # saved after the step before, never after the bad one
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "metrics.jsonl").exists() or not metrics(out)  # no row of nan figures
    off = run([PY, str(ROOT / "launch.py"), *args[:-2], f"output_dir={tmp_path / 'off'}",
               "train.stop_on_nonfinite=false"], env=env())
    assert off.returncode == 0, off.stderr  # the old behaviour on request


@pytest.mark.parametrize("name, make", [("checkpoints", "file"), ("train.log", "folder"), ("metrics.jsonl", "folder")])
def test_an_output_dir_entry_of_the_wrong_kind_is_refused_before_anything_is_written(demo_small: Path,
                                                                                   tmp_path: Path, name, make):
    out = tmp_path / "run"
    out.mkdir()
    if make == "file":
        (out / name).write_text("mine")
    else:
        (out / name).mkdir()
    res = run([PY, str(ROOT / "launch.py"), f"data.root={demo_small}", f"output_dir={out}", "model.name=tiny_cnn",
               "data.image_size=16", "data.num_workers=0", "train.epochs=1"], env=env())
    assert res.returncode == 2, res.stderr  # was: FileExistsError / IsADirectoryError, exit 1
    (line,) = [l for l in res.stderr.splitlines() if "error:" in l]
    assert f"'{out / name}' is a {make}" in line and "choose another output_dir" in line
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing else written
    if make == "file":
        assert (out / name).read_text() == "mine"
