"""Folder index, image decoding, demo data and the deterministic holdout split."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddp_trainer.config import load
from ddp_trainer.data import demo as demo_data
from ddp_trainer.data.datasets import FolderDataset, scan_splits
from ddp_trainer.data.folder_index import scan, split_holdout
from ddp_trainer.data.images import load_rgb
from ddp_trainer.data.samplers import SampleKey
from ddp_trainer.data.transforms import ImageTransform
from ddp_trainer.errors import DataError


def _img(path: Path, mode: str = "RGB", size=(10, 8), color=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        im = Image.new("P", size, 1)
        im.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    else:
        im = Image.new(mode, size, color if color is not None else (0 if mode in ("L", "1") else (1, 2, 3, 255)[:len(mode)]))
    im.save(path)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for cls in ("dog", "cat", "bird"):
        for i in range(3):
            _img(tmp_path / "train" / cls / f"{i}.png")
    _img(tmp_path / "train" / "cat" / "sub" / "deep.jpg")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    _img(tmp_path / "train" / ".ipynb_checkpoints" / "x.png")
    _img(tmp_path / "train" / "dog" / ".hidden.png")
    (tmp_path / "train" / ".git").mkdir()
    return tmp_path


def test_scan_sorted_classes_images_only_hidden_ignored(tree: Path):
    idx = scan(tree / "train")
    assert idx.classes == ("bird", "cat", "dog")
    assert idx.class_to_idx == {"bird": 0, "cat": 1, "dog": 2}
    paths = [p for p, _ in idx.samples]
    assert paths == sorted(paths, key=lambda p: (idx.class_to_idx[p.split("/")[0]], p))
    assert "cat/sub/deep.jpg" in paths
    assert not any("notes" in p or "hidden" in p or "ipynb" in p for p in paths)
    assert len(idx) == 10
    assert scan(tree / "train") == idx  # same order every time


def test_classes_from_config_set_the_order(tree: Path):
    idx = scan(tree / "train", ["dog", "cat", "bird"])
    assert idx.class_to_idx == {"dog": 0, "cat": 1, "bird": 2}
    assert idx.samples[0] == ("dog/0.png", 0)


def test_index_errors_name_the_folder(tree: Path):
    with pytest.raises(DataError, match=r"'fish'.*train/fish.*does not exist"):
        scan(tree / "train", ["dog", "cat", "bird", "fish"])
    with pytest.raises(DataError, match=r"train/bird.*not in data.classes"):
        scan(tree / "train", ["dog", "cat"])
    (tree / "train" / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/empty.* holds no images"):
        scan(tree / "train")
    with pytest.raises(DataError, match=r"data folder .*nowhere.* not found"):
        scan(tree / "nowhere")


def test_val_must_have_same_classes(tree: Path):
    for cls in ("dog", "cat"):
        _img(tree / "val" / cls / "0.png")
    cfg = load(None, [f"data.root={tree}"]).data
    with pytest.raises(DataError, match=r"val folder .*missing in val: \['bird'\]"):
        scan_splits(cfg, tree)


def test_holdout_split_is_deterministic_and_per_class(tree: Path):
    cfg = load(None, [f"data.root={tree}", "data.val_fraction=0.34"]).data
    s1, s2 = scan_splits(cfg, tree), scan_splits(cfg, tree)
    assert s1 == s2
    assert len(s1.val) == 3 and len(s1.train) == 7  # one per class of bird(3), cat(4), dog(3)
    assert sorted(l for _, l in s1.val.samples) == [0, 1, 2]
    assert not set(s1.val.samples) & set(s1.train.samples)
    tr, va = split_holdout(scan(tree / "train"), 0.5)
    assert len(va) == 4 and len(tr) == 6  # floor(n * fraction) per class: 1 + 2 + 1


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "1", "CMYK"])
def test_every_mode_becomes_rgb(tmp_path: Path, mode: str):
    ext = "jpg" if mode == "CMYK" else "png"
    t = load_rgb(str(_img(tmp_path / f"x.{ext}", mode)))
    assert t.dtype == torch.uint8 and t.shape == (3, 8, 10)


def test_palette_colours_survive(tmp_path: Path):
    t = load_rgb(str(_img(tmp_path / "p.png", "P")))
    assert t[:, 0, 0].tolist() == [200, 10, 10]


def test_corrupt_and_truncated_images_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match=r"bad.png.*data.bad_images=skip"):
        load_rgb(str(bad))
    good = _img(tmp_path / "big.jpg", "RGB", size=(64, 64), color=(10, 200, 30))
    arr = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(good, quality=95)
    data = good.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jpg"):
        load_rgb(str(cut))


def test_augmentation_depends_only_on_seed_epoch_index_and_draw(demo_small: Path):
    idx = scan(demo_small / "train")
    ds = FolderDataset(idx, ImageTransform(16, ("flip", "random_resized_crop")), seed=3)
    a = ds[SampleKey(5, 2, 1.0)][0]
    b = ds[SampleKey(5, 2, 1.0)][0]
    assert torch.equal(a, b)
    others = [ds[SampleKey(5, e, 1.0)][0] for e in range(6)]
    assert any(not torch.equal(a, o) for o in others)  # other epochs: other crops/flips
    # a sample drawn again in the same epoch (repeated_augment, class_balanced): its own crops/flips
    copies = [ds[SampleKey(5, 2, 1.0, d)][0] for d in range(1, 4)]
    assert all(not torch.equal(a, c) for c in copies)
    assert torch.equal(copies[0], ds[SampleKey(5, 2, 1.0, 1)][0])
    plain = FolderDataset(idx, ImageTransform(16, ()), seed=3)
    assert torch.equal(plain[5][0], plain[SampleKey(5, 9, 1.0)][0])


def test_demo_data_is_deterministic(tmp_path: Path):
    a = demo_data.write_demo_data(tmp_path / "a", 2, 1, 16)
    b = demo_data.write_demo_data(tmp_path / "b", 2, 1, 16)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 10 * 3
    assert [p.parent.name for p in files[:2]] == ["circle_cool", "circle_cool"]
    for rel in files:
        assert torch.equal(load_rgb(str(a / rel)), load_rgb(str(b / rel)))


def test_ensure_demo_data_is_atomic_and_cached(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DDP_TRAINER_CACHE", str(tmp_path))
    monkeypatch.setattr(demo_data, "TRAIN_PER_CLASS", 2)
    monkeypatch.setattr(demo_data, "VAL_PER_CLASS", 1)

    calls = []
    real = demo_data.write_demo_data

    def counting(out, *a, **k):
        calls.append(out)
        return real(out, 2, 1, 16)

    monkeypatch.setattr(demo_data, "write_demo_data", counting)
    root = demo_data.ensure_demo_data()
    assert (root / "COMPLETE").exists() and len(list((root / "train").iterdir())) == 10
    assert demo_data.ensure_demo_data() == root and len(calls) == 1  # reused, not rewritten
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left behind
