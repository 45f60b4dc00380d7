"""``ddp-trainer check``: the data and config as training sees them, without training or writing."""
import shutil
from pathlib import Path

from conftest import PY, run


def _check(*args: str):
    return run([PY, "-m", "ddp_trainer", "check", *args], timeout=120)


def test_check_reports_counts_types_batches_and_cache(demo_small: Path, tmp_path: Path):
    data = tmp_path / "data"
    shutil.copytree(demo_small, data)
    (data / "train" / "ring_cool" / "extra.jpg").write_bytes((demo_small / "train" / "ring_cool" / "00000.png").read_bytes())
    out = tmp_path / "run"
    res = _check(f"data.root={data}", f"output_dir={out}", "--nproc", "2", "data.batch_size=8", "data.cache=decoded",
                 f"data.cache_dir={tmp_path / 'cache'}", "model.name=tiny_cnn_bn", "data.image_size=16")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "train: 121 images in 10 classes; file types: .png 120, .jpg 1" in text
    assert "val: 40 images in 10 classes; file types: .png 40" in text
    assert "    ring_cool      13" in text and "    ring_warm      12" in text
    # 121 images, global batch 16: 7 full steps, 9 left out each epoch
    assert "global batch 16 = 8 x 2 process(es) x 1; 7 optimizer step(s) per epoch; 9 image(s) of each epoch left out" in text
    assert "train: decoded-" in text and "(121 images at 16x16, 92.9 KB) to build" in text
    assert "images: not decoded (add --verify" in text
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing written


def test_check_verify_lists_unreadable_images_and_exits_2(demo_small: Path, tmp_path: Path):
    data = tmp_path / "data"
    shutil.copytree(demo_small, data)
    (data / "train" / "cross_cool" / "broken.jpg").write_bytes(b"not an image at all")
    (data / "val" / "ring_warm" / "half.png").write_bytes((demo_small / "val" / "ring_warm" / "00000.png").read_bytes()[:60])
    res = _check(f"data.root={data}", "--verify", "data.num_workers=2")
    assert res.returncode == 2, res.stderr
    assert "images: decoded 162 in" in res.stdout and "; 2 unreadable" in res.stdout
    assert "train: 'cross_cool/broken.jpg': cannot decode image" in res.stdout
    assert "val: 'ring_warm/half.png': cannot decode image" in res.stdout
    assert "BytesIO" not in res.stdout
    skip = _check(f"data.root={data}", "--verify", "data.bad_images=skip")
    assert skip.returncode == 0 and "data.bad_images=skip would leave these files out" in skip.stdout


def test_check_refuses_what_training_would_refuse(demo_small: Path, tmp_path: Path):
    res = _check(f"data.root={tmp_path / 'missing'}")
    assert res.returncode == 2 and "data folder" in res.stderr and "data.root" in res.stderr
    res = _check(f"data.root={demo_small}", "data.batch_size=1", "model.name=tiny_cnn_bn")
    assert res.returncode == 2 and "data.batch_size=1 with a model that has BatchNorm" in res.stderr
    res = _check(f"data.root={demo_small}", "--nproc", "61", "model.name=tiny_cnn")
    assert res.returncode == 2 and "fewer than 2 per process for 61 process(es)" in res.stderr
    res = _check("train.epohcs=3")
    assert res.returncode == 2 and "did you mean 'train.epochs'" in res.stderr
