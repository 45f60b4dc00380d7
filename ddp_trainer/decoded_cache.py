"""``data.cache: decoded``: every image decoded and resized once into one memory-mapped uint8 file.

One file per node (nodes need not share a filesystem), built by *every* local rank of the node
(each decodes a contiguous share, with its loader workers) into one temporary file that local rank 0
created, preallocated and locked; local rank 0 renames it into place once all shares are written,
so a reader never sees a half-written cache. Reused by every rank of the node and by later runs;
rebuilt when the dataset (paths, labels, sizes, modification times) or the stored size changes: the
file name is a hash of all of these.

A build that dies (SIGKILL, node failure) leaves its temporary file behind, but its lock dies with
it: the next build on that folder removes every temporary file whose lock it can take.

The file is raw ``uint8`` of shape ``(images, 3, size, size)`` (named in the file name), so its
exact size is known before building, and the free space is checked against it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError
from .folder_index import FolderIndex
from .progress import Ticker
from .transforms import ImageTransform, load_rgb

log = logging.getLogger("ddp_trainer")
VERSION = 2
SLOW_ENV = "DDP_TRAINER_TEST_SLOW_CACHE"  # test hook: "RANK:SECONDS" - that global rank sleeps per image
TMP_GLOB = ".decoded-*.tmp-*"
CHUNK = 64  # images per loader item when decoding


def cache_key(index: FolderIndex, size: int) -> str:
    """A hash of the stored size, the root, and every file's path, label, size and modification time.

    The ``stat`` calls run in a thread pool: on a parallel filesystem each is a round trip."""
    def stat(rel: str) -> tuple[int, int]:
        st = os.stat(os.path.join(index.root, rel))
        return st.st_size, st.st_mtime_ns

    h = hashlib.sha256(f"v{VERSION} {size} {index.root}\n".encode())
    with ThreadPoolExecutor(max_workers=16) as pool:
        stats = pool.map(stat, [rel for rel, _ in index.samples], chunksize=4096)
        for (rel, label), (nbytes, mtime) in zip(index.samples, stats):
            h.update(f"{rel}\t{label}\t{nbytes}\t{mtime}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:24]


def nbytes(images: int, size: int) -> int:
    """The exact size of a cache file."""
    return images * 3 * size * size


def file_name(key: str, images: int, size: int) -> str:
    return f"decoded-{key}-{images}x3x{size}x{size}.u8"


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError


def remove_dead_builds(folder: Path) -> list[Path]:
    """Delete the temporary files of builds that no longer run (their lock is free); return them."""
    removed = []
    for tmp in sorted(folder.glob(TMP_GLOB)):
        try:
            fd = os.open(tmp, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # a live build (another job on this node) holds it
            continue
        try:
            size = os.fstat(fd).st_size
            tmp.unlink()
            removed.append(tmp)
            log.warning("data.cache: removed %s (%s), left by a cache build that did not finish", tmp, _human(size))
        finally:
            os.close(fd)
    return removed


@dataclass
class _Target:
    """Where this node's cache is, and the temporary file to fill when it must be built."""

    path: Path
    tmp: Path | None  # None: the cache exists


class _NodeBuilder:
    """Local rank 0's side of a build: check, clean up, reserve, lock; then rename or remove."""

    def __init__(self, index: FolderIndex, size: int, folder: Path) -> None:
        self.index, self.size, self.folder = index, size, Path(folder)
        self.fd: int | None = None
        self.tmp: Path | None = None  # ours, until renamed
        self.target: _Target | None = None

    def prepare(self) -> _Target:
        path = self.folder / file_name(cache_key(self.index, self.size), len(self.index), self.size)
        if path.exists():
            self.target = _Target(path, None)
            return self.target
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"data.cache_dir '{self.folder}' cannot be created ({exc.strerror}); set "
                            f"data.cache_dir to a writable folder") from None
        remove_dead_builds(self.folder)
        need = nbytes(len(self.index), self.size)
        free = shutil.disk_usage(self.folder).free
        if free < need:
            raise DataError(self._no_space(need, free))
        tmp = path.with_name(f".{path.name}.tmp-{os.uname().nodename}-{os.getpid()}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until rename or death: the next build knows we are alive
        self.fd, self.tmp = fd, tmp
        try:
            os.posix_fallocate(fd, 0, need)  # reserve it all now: a full disk later would be a SIGBUS
        except OSError as exc:
            self.abort()
            raise DataError(self._no_space(need, shutil.disk_usage(self.folder).free, exc.strerror)) from None
        self.target = _Target(path, tmp)
        log.info("data.cache: building %s (%d images at %dx%d, %s)", path, len(self.index), self.size, self.size,
                 _human(need))
        return self.target

    def _no_space(self, need: int, free: int, why: str | None = None) -> str:
        return (f"data.cache=decoded needs {_human(need)} for {len(self.index)} images at {self.size}x{self.size} "
                f"in '{self.folder}', but {_human(free)} is free there{f' ({why})' if why else ''}; set "
                f"data.cache_dir to a folder with more space, lower data.cache_size, or use data.cache=none")

    def finish(self) -> None:
        target = self.target
        if target is None or target.tmp is None:
            return
        assert self.fd is not None
        os.fsync(self.fd)
        os.replace(target.tmp, target.path)
        self.tmp = None
        os.close(self.fd)
        self.fd = None
        target.path.with_suffix(".json").write_text(json.dumps(
            {"root": self.index.root, "images": len(self.index), "size": self.size, "version": VERSION}))

    def abort(self) -> None:
        """Remove our temporary file (a failed build leaves nothing behind)."""
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _DecodeInto(torch.utils.data.Dataset):
    """Item ``k`` decodes chunk ``k`` of this rank's share into the memory-mapped temporary file."""

    def __init__(self, index: FolderIndex, size: int, tmp: Path, lo: int, hi: int, slow_s: float) -> None:
        self.index, self.size, self.tmp, self.lo, self.hi, self.slow_s = index, size, tmp, lo, hi, slow_s
        self.fit = ImageTransform(size)
        self._arr: np.memmap | None = None

    def __len__(self) -> int:
        return -(-(self.hi - self.lo) // CHUNK)

    def __getitem__(self, k: int) -> int:
        if self._arr is None:
            self._arr = np.memmap(self.tmp, dtype=np.uint8, mode="r+", shape=(len(self.index), 3, self.size, self.size))
        start = self.lo + k * CHUNK
        stop = min(start + CHUNK, self.hi)
        for i in range(start, stop):
            self._arr[i] = self.fit.fit(load_rgb(self.index.path(i))).numpy()
            if self.slow_s:
                time.sleep(self.slow_s)
        return stop - start

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arr": None}  # each worker maps the file itself


def _slow_hook(rank: int) -> float:
    raw = os.environ.get(SLOW_ENV, "")
    who, _, seconds = raw.partition(":")
    return float(seconds) if raw and int(who) == rank else 0.0


def _fill(index: FolderIndex, size: int, tmp: Path, share: int, shares: int, workers: int, slow_s: float) -> None:
    """Decode this process's contiguous share of the images into ``tmp``."""
    n = len(index)
    lo, hi = n * share // shares, n * (share + 1) // shares
    if hi <= lo:
        return
    ds = _DecodeInto(index, size, tmp, lo, hi, slow_s)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    ticker = Ticker(f"data.cache: decoding {index.root}", total=n, scale=shares)
    for count in loader:
        ticker.tick(int(count))
    if ds._arr is not None:
        ds._arr.flush()


def ensure(index: FolderIndex, size: int, folder: Path, dist: Any, workers: int = 0) -> Path:
    """This node's cache of ``index`` at ``size``, built first if missing. Every rank calls this;
    every local rank of a node that builds decodes a share. A failure on any rank fails all."""
    env = dist.env
    builder = _NodeBuilder(index, size, folder) if env.is_local_main else None
    try:
        with dist.waiting("local rank 0 of each node to check the decoded cache"):
            mine = dist.all_ok(lambda: builder.prepare() if builder is not None else None)
            targets = dist.all_gather_object((env.node_rank, mine))
        target = next(t for node, t in targets if node == env.node_rank and t is not None)
        if target.tmp is not None or any(t is not None and t.tmp is not None for _, t in targets):
            t0 = time.monotonic()
            with dist.waiting("the decoded cache build (every local rank decodes a share)"):
                if target.tmp is not None:
                    dist.all_ok(lambda: _fill(index, size, target.tmp, env.local_rank, env.local_world_size,
                                              workers, _slow_hook(env.rank)))
                else:
                    dist.all_ok(lambda: None)  # this node has its cache; join the others' collectives
                dist.all_ok(lambda: builder.finish() if builder is not None else None)
            if target.tmp is not None:
                elapsed = time.monotonic() - t0
                log.info("data.cache: decoded %d images of %s in %.1f s (%.0f images/s, %d process(es) on the "
                         "node) into %s", len(index), index.root, elapsed, len(index) / max(elapsed, 1e-9),
                         env.local_world_size, target.path)
    except BaseException:
        if builder is not None:
            builder.abort()
        raise
    return target.path


class CachedImages:
    """``images[i]`` -> uint8 CHW tensor from the memory-mapped cache (opened lazily in each worker)."""

    def __init__(self, path: Path, images: int, size: int) -> None:
        self.path = Path(path)
        self.shape = (images, 3, size, size)
        self._arr: np.memmap | None = None

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._arr is None:
            self._arr = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)
        return torch.from_numpy(np.array(self._arr[i]))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arr": None}  # workers reopen the map instead of pickling it


def build(index: FolderIndex, size: int, folder: Path, workers: int = 0) -> Path:
    """:func:`ensure` in one process without a process group (tools, tests, benchmarks)."""
    from .distributed import Dist
    from .env import LaunchEnv

    return ensure(index, size, folder, Dist(env=LaunchEnv(), backend=None, device=torch.device("cpu")), workers)
