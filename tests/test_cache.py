"""data.cache=decoded: same pixels as decoding, rebuilt when a file changes, never half-written, built
by every local rank, never racing the collective timeout, and no garbage left by a killed build."""
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import PY, ROOT, TORCHRUN, child_env, kill_when, launch, metrics
from PIL import Image

from ddp_trainer.data import decoded_cache
from ddp_trainer.data.folder_index import scan
from ddp_trainer.data.images import load_rgb
from ddp_trainer.data.transforms import ImageTransform


def _images(path: Path) -> decoded_cache.CachedImages:
    n, _, s, _ = (int(x) for x in path.name.rsplit("-", 1)[1].removesuffix(".u8").split("x"))
    return decoded_cache.CachedImages(path, n, s)


def test_cache_pixels_equal_decoding(demo_small: Path, tmp_path: Path):
    idx = scan(demo_small / "val")
    path = decoded_cache.build(idx, 12, tmp_path)  # 16 px files resized to 12: the resize is in both
    assert path.stat().st_size == decoded_cache.nbytes(len(idx), 12) == len(idx) * 3 * 12 * 12
    images = _images(path)
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
    assert _images(second)[i][:, 0, 0].tolist() == [1, 2, 3]
    assert decoded_cache.build(scan(data), 8, tmp_path / "c") not in (first, second)  # size change: rebuilt


def test_dead_builds_are_removed_and_live_ones_kept(demo_small: Path, tmp_path: Path):
    idx = scan(demo_small / "val")
    host = decoded_cache.this_host()
    dead = tmp_path / f".decoded-abc-1x3x16x16.u8.tmp-{host}-999999"
    dead.write_bytes(b"\0" * 100)  # what a killed build leaves behind: nobody holds its lock
    holder = subprocess.Popen([PY, "-c", "import fcntl, os, sys, time; p = sys.stdin.readline().strip(); "
                               "fd = os.open(p, os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); "
                               "time.sleep(60)"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    live = tmp_path / f".decoded-def-1x3x16x16.u8.tmp-{host}-{holder.pid}"  # a build of this host, running
    live.write_bytes(b"\0" * 100)
    holder.stdin.write(f"{live}\n")
    holder.stdin.flush()
    try:
        assert holder.stdout.readline().strip() == "locked"
        path = decoded_cache.build(idx, 16, tmp_path)
        assert not dead.exists()  # removed
        assert live.exists()  # another job's build in progress: left alone
        assert path.exists() and not [p for p in tmp_path.glob(".*.tmp-*") if p != live]
    finally:
        holder.kill()
        holder.wait()
    decoded_cache.build(idx, 8, tmp_path)
    assert not live.exists()  # its holder died: the next build removes it


def _write_rgb(root: Path, classes: int, per_class: int, size: int) -> Path:
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        d = root / f"c{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            px = torch.randint(0, 256, (size, size + 7, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(px).save(d / f"{i:03d}.png")
    return root


def test_random_crops_come_from_a_larger_stored_image(tmp_path: Path):
    data = _write_rgb(tmp_path / "d", 2, 3, 40)
    from ddp_trainer.config import load
    from ddp_trainer.data.datasets import FolderDataset
    from ddp_trainer.data.samplers import SampleKey

    cfg = load(None, ["data.image_size=16", "data.augment=[random_resized_crop]"]).data
    assert cfg.train_cache_size == math.ceil(16 * 1.15) == 19
    assert load(None, ["data.image_size=16"]).data.train_cache_size == 16  # no random crop: stored at image_size
    assert load(None, ["data.image_size=16", "data.cache_size=24", "data.augment=[random_resized_crop]"]
                ).data.train_cache_size == 24
    idx = scan(data)
    path = decoded_cache.build(idx, cfg.train_cache_size, tmp_path / "c")
    assert path.name.endswith(f"-{len(idx)}x3x19x19.u8")
    transform = ImageTransform(16, ("random_resized_crop",))
    cached = FolderDataset(idx, transform, seed=1, cached=_images(path))
    for i in range(len(idx)):
        key = SampleKey(i, 2, 1.0)
        # the crop is taken from the stored 19x19 picture (shorter side 19, centre square), then resized to 16
        gen = torch.Generator().manual_seed(__import__("ddp_trainer.data.transforms", fromlist=["x"]).sample_seed(1, 2, i))
        expect = transform(ImageTransform(19).fit(load_rgb(idx.path(i))), gen)
        assert torch.equal(cached[key][0], expect)
        assert cached[key][0].shape == (3, 16, 16)


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 256 KiB tmpfs (needs root; CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_too_little_space_is_a_clear_error_before_building(small_args, tiny_disk: Path):
    res = launch(0, *small_args, "data.cache=decoded", f"data.cache_dir={tiny_disk}", "data.image_size=64",
                 timeout=120)
    assert res.returncode == 2, res.stderr
    line = [l for l in res.stderr.splitlines() if "error:" in l][0]
    need = decoded_cache.human_bytes(decoded_cache.nbytes(120, 64))
    assert f"data.cache=decoded needs {need} for 120 images at 64x64 in '{tiny_disk}'" in line
    assert "is free there" in line and "data.cache_dir" in line
    assert not list(tiny_disk.iterdir())  # nothing written


@pytest.mark.slow
def test_two_processes_build_one_cache_together(small_args, tmp_path: Path):
    env = child_env(DDP_TRAINER_CACHE=str(tmp_path / "cache"))
    res = launch(2, *small_args, "data.cache=decoded", "train.epochs=1", env=env, timeout=180)
    assert res.returncode == 0, res.stderr
    files = sorted((tmp_path / "cache" / "decoded").glob("decoded-*.u8"))
    assert len(files) == 2  # train and val: one file each for both ranks
    assert res.stderr.count("2 process(es) on the node") == 2  # both ranks decoded a share of each
    assert len(metrics(tmp_path / "run")) == 1
    data = Path(next(a for a in small_args if a.startswith("data.root=")).split("=", 1)[1])
    val = scan(data / "val")
    images = _images(next(f for f in files if f"-{len(val)}x3x" in f.name))
    fit = ImageTransform(16)
    assert all(torch.equal(images[i], fit.fit(load_rgb(val.path(i)))) for i in range(len(val)))


@pytest.mark.slow
def test_a_build_longer_than_the_collective_timeout_does_not_fail(small_args, tmp_path: Path):
    # rank 0 decodes its 60 training images at 0.12 s each: rank 1 waits ~7 s, past dist.timeout_s=5
    env = child_env(DDP_TRAINER_CACHE=str(tmp_path / "cache"), FAULT_SLOW_CACHE="0:0.12")
    t0 = time.monotonic()
    res = launch(2, *small_args, "data.cache=decoded", "train.epochs=1", "dist.timeout_s=5", env=env, timeout=180)
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 > 7
    assert "collective timeout lowered to dist.timeout_s=5 s after the first step" in res.stderr
    # the same wait with a preparation timeout shorter than the build: a clear line saying what it waited for
    shutil.rmtree(tmp_path / "cache")
    out = tmp_path / "run2"
    res = launch(2, *small_args, f"output_dir={out}", "data.cache=decoded", "train.epochs=1",
                 "dist.init_timeout_s=3", env=env, timeout=180)
    assert res.returncode == 1, res.stderr
    assert "gave up after waiting 3 s for the decoded cache build (every local rank decodes a share)" in res.stderr
    assert "dist.init_timeout_s" in res.stderr


@pytest.mark.slow
def test_a_build_killed_midway_leaves_nothing_after_the_next_run(small_args, tmp_path: Path):
    cache = tmp_path / "cache" / "decoded"
    env = child_env(DDP_TRAINER_CACHE=str(tmp_path / "cache"), FAULT_SLOW_CACHE="0:0.2")
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"), *small_args,
           "data.cache=decoded", "train.epochs=1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    started = []

    def one_second_into_the_build():
        if not started and list(cache.glob(".*.tmp-*")):
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] > 1.0

    kill_when(proc, one_second_into_the_build)  # the agent, both ranks and their workers
    left = list(cache.glob(".*.tmp-*"))
    assert len(left) == 1 and left[0].stat().st_size > 0  # what SIGKILL leaves
    res = launch(2, *small_args, "data.cache=decoded", "train.epochs=1",
                 env=child_env(DDP_TRAINER_CACHE=str(tmp_path / "cache")), timeout=180)
    assert res.returncode == 0, res.stderr
    assert f"data.cache: removed {left[0]}" in res.stderr
    assert not list(cache.glob(".*.tmp-*"))
    assert len(list(cache.glob("decoded-*.u8"))) == 2


def test_a_damaged_cache_is_noticed_when_opened_and_built_again(demo_small: Path, tmp_path: Path, caplog):
    idx = scan(demo_small / "train")  # 120 images: two checksummed chunks
    path = decoded_cache.build(idx, 16, tmp_path)
    good = path.read_bytes()
    with open(path, "r+b") as f:  # the second half zeroed on disk
        f.seek(len(good) // 2)
        f.write(b"\0" * (len(good) - len(good) // 2))
    assert "differ from what was written (damaged on disk)" in decoded_cache.damage(path, len(idx), 16)
    with caplog.at_level("WARNING", logger="ddp_trainer"):
        assert decoded_cache.build(idx, 16, tmp_path) == path  # was: reused, trained on black images, exit 0
    assert f"{path} is damaged (images 0-63 differ from what was written (damaged on disk)); building it again" \
        in caplog.text
    assert path.read_bytes() == good
    with open(path, "r+b") as f:
        f.truncate(len(good) - 100)
    assert "holds 92,060 bytes where 92,160 were written" in decoded_cache.damage(path, len(idx), 16)
    decoded_cache.build(idx, 16, tmp_path)  # was: ValueError: mmap length is greater than file size; not rebuilt
    assert path.read_bytes() == good
    with open(path, "r+b") as f:  # one byte: a sample of chunks may miss it, check --verify does not
        f.seek(100)
        f.write(bytes([good[100] ^ 1]))
    assert decoded_cache.damage(path, len(idx), 16, sample=None) is not None


def test_a_read_only_cache_folder_is_named_by_the_run_and_by_check(small_args, tmp_path: Path, require_root):
    cache = tmp_path / "cache"
    cache.mkdir()
    subprocess.run(["mount", "--bind", str(cache), str(cache)], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", str(cache)], check=True)
    try:
        res = launch(0, *small_args, "data.cache=decoded", f"data.cache_dir={cache}", "train.epochs=1", timeout=120)
        # was: a raw OSError, exit 1, while check said the space was enough
        assert res.returncode == 2, res.stderr
        assert f"data.cache_dir '{cache}' is not writable" in res.stderr
        data = next(a for a in small_args if a.startswith("data.root="))
        chk = subprocess.run([PY, "-m", "ddp_trainer", "check", data, "data.cache=decoded", f"data.cache_dir={cache}",
                              "model.name=tiny_cnn_bn", "data.image_size=16"], capture_output=True, text=True,
                             timeout=120, env=child_env(), cwd=ROOT)
        assert chk.returncode == 2, chk.stdout + chk.stderr
        assert f"'{cache}' is NOT writable" in chk.stdout
    finally:
        subprocess.run(["umount", "-l", str(cache)])
