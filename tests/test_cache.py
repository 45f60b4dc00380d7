"""data.cache=decoded: same pixels as decoding, rebuilt when a file changes, never half-written."""
import os
import shutil
from pathlib import Path

import torch
from PIL import Image

from conftest import launch, metrics
from ddp_trainer import decoded_cache
from ddp_trainer.folder_index import scan
from ddp_trainer.transforms import ImageTransform, load_rgb


def test_cache_pixels_equal_decoding(demo_small: Path, tmp_path: Path):
    idx = scan(demo_small / "val")
    path = decoded_cache.build(idx, 12, tmp_path)  # 16 px files resized to 12: the resize is in both
    images = decoded_cache.CachedImages(path)
    fit = ImageTransform(12)
    for i in range(len(idx)):
        assert torch.equal(images[i], fit.fit(load_rgb(idx.path(i))))
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_cache_is_reused_and_rebuilt_when_a_file_changes(demo_small: Path, tmp_path: Path):
    data = tmp_path / "d"
    shutil.copytree(demo_small / "val", data)
    first = decoded_cache.build(scan(data), 16, tmp_path / "c")
    mtime = first.stat().st_mtime_ns
    assert decoded_cache.build(scan(data), 16, tmp_path / "c") == first and first.stat().st_mtime_ns == mtime
    victim = sorted((data / "cross_cool").iterdir())[0]
    Image.new("RGB", (16, 16), (1, 2, 3)).save(victim)
    os.utime(victim, ns=(1, 1))
    second = decoded_cache.build(scan(data), 16, tmp_path / "c")
    assert second != first
    idx = scan(data)
    i = [p for p, _ in idx.samples].index(f"cross_cool/{victim.name}")
    assert decoded_cache.CachedImages(second)[i][:, 0, 0].tolist() == [1, 2, 3]
    assert decoded_cache.build(scan(data), 8, tmp_path / "c") not in (first, second)  # size change: rebuilt


def test_a_stale_partial_file_is_never_read(demo_small: Path, tmp_path: Path):
    idx = scan(demo_small / "val")
    final = decoded_cache.cache_path(tmp_path, idx, 16)
    partial = final.with_name(f".{final.name}.tmp-999999")
    partial.write_bytes(b"\0" * 100)  # what a killed build leaves behind
    path = decoded_cache.build(idx, 16, tmp_path)
    assert path == final and decoded_cache.open_cache(path).shape == (len(idx), 3, 16, 16)


def test_training_with_the_decoded_cache(small_args, tmp_path: Path):
    from conftest import child_env

    env = child_env(DDP_TRAINER_CACHE=str(tmp_path / "cache"))
    res = launch(2, *small_args, "data.cache=decoded", "train.epochs=1", env=env, timeout=180)
    assert res.returncode == 0, res.stderr
    files = sorted((tmp_path / "cache" / "decoded").glob("decoded-*.u8"))
    assert len(files) == 2  # train and val, built once (by local rank 0) for both ranks
    assert len(metrics(tmp_path / "run")) == 1
