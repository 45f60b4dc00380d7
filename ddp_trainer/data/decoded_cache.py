"""``data.cache: decoded``: every image decoded and resized once into one memory-mapped uint8 file.

One file per node (nodes need not share a filesystem), built by *every* local rank of the node
(each decodes a contiguous share, with its loader workers) into one temporary file that local rank 0
created, preallocated and locked; local rank 0 renames it into place once all shares are written,
so a reader never sees a half-written cache. Reused by every rank of the node and by later runs;
rebuilt when the dataset (paths, labels, sizes, modification times) or the stored size changes: the
file name is a hash of all of these (each local rank fingerprints a share of the files).

A build that dies (SIGKILL, node failure) leaves its temporary file behind, named with its host and
process id, but its lock dies with it. The next build on this host removes this host's leftovers
whose lock it can take (on one host the lock is the proof of life: the kernel releases it when the
process dies, while its pid may linger as a zombie or be reused). Another host's temporary files are never touched, since a shared cache folder
may hold another node's build in progress and the lock (``flock``) may not reach across nodes.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from ..fsutil import atomic_write_text, human_bytes, publish
from ..launch.dist import Dist
from ..progress import Ticker
from .demo import cache_root
from .folder_index import FolderIndex
from . import decode
from .decode import MAX_IMAGE_PIXELS, decode_rgb
from .transforms import ImageTransform
from .workers import start_method

log = logging.getLogger("ddp_trainer")
VERSION = 3  # 3: pictures turned by their EXIF orientation, 16-bit and float images scaled
TMP_GLOB = ".decoded-*.tmp-*"
CHUNK = 64  # images per loader item when decoding (and per checksum)
SAMPLE_CHUNKS = 8  # chunks re-hashed when a run opens a cache (all of them under check --verify)
STAT_CHUNK = 4096  # files per digest of the cache key


def file_digests(index: FolderIndex, share: int = 0, shares: int = 1) -> dict[int, bytes]:
    """Digests of chunks ``share, share + shares, ...`` of the samples' change marks (a file's path,
    label, size and mtime).

    The chunks are fixed (``STAT_CHUNK`` files), so the key does not depend on how many processes
    share the ``stat`` calls: each local rank of a node takes some chunks (one ``stat`` per file is
    the whole cost: about 6 us here, a network round trip on a parallel filesystem)."""
    out = {}
    n = len(index)
    for c in range(share, -(-n // STAT_CHUNK), shares):
        h = hashlib.sha256()
        h.update("".join(index.change_marks(c * STAT_CHUNK, min(n, (c + 1) * STAT_CHUNK))).encode(
            "utf-8", "surrogateescape"))
        out[c] = h.digest()
    return out


def _geometry(size: int, resize: int | None, interpolation: str, reduced: bool = False) -> str:
    """What the stored squares are, beyond their side (empty for the default: the keys stay as before),
    the decoder's pixel family among it (:func:`.decode.pixel_family`) and, with ``reduced``, the
    smallest divisor PIL's draft decodes at (:func:`.decode.draft_from`: the scales below it are the
    decoder's full decode, other pixels)."""
    parts = ([f"resize={resize}"] if resize not in (None, size) else []) + (
        [f"interpolation={interpolation}"] if interpolation != "bilinear" else []) + (
        [_reduced_tag()] if reduced else []) + (
        [f"decoder={decode.pixel_family()}"] if decode.pixel_family() else [])  # PIL's pixels differ
    return (" " + " ".join(parts)) if parts else ""


def _reduced_tag() -> str:
    # the draft at every divisor (2 and up) was the only rule before there was a choice: its caches
    # keep their key; a rule that hands divisor 2 (or more) to the decoder names where the draft starts
    d = decode.draft_from()
    return "reduced_decode" if d == 2 else f"reduced_decode=draft{d}"


def combine_key(index: FolderIndex, size: int, digests: dict[int, bytes], resize: int | None = None,
                interpolation: str = "bilinear", reduced: bool = False) -> str:
    """The cache key from every chunk's digest: the stored geometry, the root and every file's fingerprint."""
    geometry = _geometry(size, resize, interpolation, reduced)
    h = hashlib.sha256(f"v{VERSION} {size}{geometry} {index.root}\n".encode("utf-8", "surrogateescape"))
    for c in range(-(-len(index) // STAT_CHUNK)):
        h.update(digests[c])
    return h.hexdigest()[:24]


def cache_key(index: FolderIndex, size: int, resize: int | None = None, interpolation: str = "bilinear",
              reduced: bool = False) -> str:
    """:func:`combine_key` computed by this process alone."""
    return combine_key(index, size, file_digests(index), resize, interpolation, reduced)


def nbytes(images: int, size: int) -> int:
    """The exact size of a cache file."""
    return images * 3 * size * size


def file_name(key: str, images: int, size: int) -> str:
    return f"decoded-{key}-{images}x3x{size}x{size}.u8"


def this_host() -> str:
    """The host name that temporary files carry (``.<cache>.tmp-<host>-<pid>``)."""
    return os.uname().nodename


def _host_of(tmp: Path) -> str | None:
    """The host in a temporary file's name (``...tmp-<host>-<pid>``); None when it names none."""
    host, _, pid = tmp.name.rpartition(".tmp-")[2].rpartition("-")
    return host if host and pid.isdigit() else None


def remove_dead_builds(folder: Path) -> list[Path]:
    """Delete this host's temporary files of builds that no longer run (their lock is free); return
    them. Other hosts' files are left alone, whatever their state."""
    removed = []
    host = this_host()
    for tmp in sorted(folder.glob(TMP_GLOB)):
        if _host_of(tmp) != host:
            continue  # another node's: its build may be running, under a lock this node cannot see
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
            log.warning("data.cache: removed %s (%s), left by a cache build that did not finish", tmp, human_bytes(size))
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

    def prepare(self, key: str) -> _Target:
        path = self.folder / file_name(key, len(self.index), self.size)
        if path.exists():
            why = damage(path, len(self.index), self.size)
            if why is None:
                self.target = _Target(path, None)
                return self.target
            log.warning("data.cache: %s is damaged (%s); building it again", path, why)
            path.unlink()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"data.cache_dir '{self.folder}' cannot be created ({exc.strerror}); set "
                            f"data.cache_dir to a writable folder") from None
        if not writable(self.folder):
            raise DataError(_not_writable(self.folder))
        remove_dead_builds(self.folder)
        need = nbytes(len(self.index), self.size)
        free = shutil.disk_usage(self.folder).free
        if free < need:
            raise DataError(self._no_space(need, free))
        tmp = path.with_name(f".{path.name}.tmp-{this_host()}-{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise DataError(_not_writable(self.folder, exc.strerror)) from None
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until rename or death: the next build knows we are alive
        self.fd, self.tmp = fd, tmp
        try:
            os.posix_fallocate(fd, 0, need)  # reserve it all now: a full disk later would be a SIGBUS
        except OSError as exc:
            self.abort()
            raise DataError(self._no_space(need, shutil.disk_usage(self.folder).free, exc.strerror)) from None
        self.target = _Target(path, tmp)
        log.info("data.cache: building %s (%d images at %dx%d, %s)", path, len(self.index), self.size, self.size,
                 human_bytes(need))
        return self.target

    def _no_space(self, need: int, free: int, why: str | None = None) -> str:
        return (f"data.cache=decoded needs {human_bytes(need)} for {len(self.index)} images at {self.size}x{self.size} "
                f"in '{self.folder}', but {human_bytes(free)} is free there{f' ({why})' if why else ''}; set "
                f"data.cache_dir to a folder with more space, lower data.cache_size, or use data.cache=none")

    def finish(self, chunks: list[tuple[int, int, str]]) -> None:
        """Publish the cache, its record first (the chunks' checksums): a published cache always has one."""
        target = self.target
        if target is None or target.tmp is None:
            return
        assert self.fd is not None
        os.fsync(self.fd)
        atomic_write_text(record_path(target.path), json.dumps(
            {"root": self.index.root, "images": len(self.index), "size": self.size, "version": VERSION,
             "chunks": sorted(chunks)}))
        publish(target.tmp, target.path)
        self.tmp = None
        os.close(self.fd)
        self.fd = None

    def abort(self) -> None:
        """Remove our temporary file (a failed build leaves nothing behind)."""
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _DecodeInto(torch.utils.data.Dataset):
    """Item ``k`` decodes chunk ``k`` of this rank's share and writes it into the temporary file
    (one ``pwrite`` per chunk at its offset: no shared mapping whose page faults the ranks contend on)."""

    def __init__(self, index: FolderIndex, fit: ImageTransform, tmp: Path, lo: int, hi: int, max_pixels: int,
                 reduced: bool = False) -> None:
        self.index, self.size, self.tmp, self.lo, self.hi, self.max_pixels = index, fit.size, tmp, lo, hi, max_pixels
        self.fit = fit
        # data.reduced_decode: a JPEG may be decoded at 1/2..1/8 scale while its shorter side keeps
        # twice what the resize that follows needs (with only 1.2x, a 500x375 photo decoded at 1/8
        # for a 40 px square differs from the full decode by 5.7 per channel value on average; with
        # 2x, the cache is built once and worth the quality)
        self.min_side = 2 * (fit.resize or fit.size) if reduced else None
        self._fd: int | None = None

    def __len__(self) -> int:
        return -(-(self.hi - self.lo) // CHUNK)

    def __getitem__(self, k: int) -> tuple[int, int, str]:
        if self._fd is None:
            self._fd = os.open(self.tmp, os.O_WRONLY)
        start = self.lo + k * CHUNK
        stop = min(start + CHUNK, self.hi)
        out = np.empty((stop - start, 3, self.size, self.size), dtype=np.uint8)
        for i in range(start, stop):
            img = decode_rgb(self.index.read(i), self.index.name(i), self.max_pixels, self.min_side)
            out[i - start] = self.fit.fit(img).numpy()
        os.pwrite(self._fd, out.data, start * nbytes(1, self.size))
        return start, stop, _digest(out.tobytes())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}  # each worker opens the file itself


def _fill(index: FolderIndex, fit: ImageTransform, tmp: Path, share: int, shares: int, workers: int,
          max_pixels: int, reduced: bool = False,
          worker_init_fn: Callable[[int], None] | None = None) -> list[tuple[int, int, str]]:
    """Decode this process's contiguous share of the images into ``tmp``; returns the checksum of
    each chunk written, ``(first image, end, digest)``."""
    n = len(index)
    lo, hi = n * share // shares, n * (share + 1) // shares
    chunks: list[tuple[int, int, str]] = []
    if hi <= lo:
        return chunks
    ds = _DecodeInto(index, fit, tmp, lo, hi, max_pixels, reduced)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, worker_init_fn=worker_init_fn,
                                         multiprocessing_context=start_method(workers))
    ticker = Ticker(f"data.cache: decoding {index.root}", total=n, scale=shares)
    try:
        for start, stop, digest in loader:
            chunks.append((int(start), int(stop), digest))
            ticker.tick(int(stop) - int(start))
    finally:
        ds.close()
    return chunks


def ensure(index: FolderIndex, size: int, folder: Path, dist: Dist, workers: int = 0, resize: int | None = None,
           interpolation: str = "bilinear", max_pixels: int = MAX_IMAGE_PIXELS, reduced: bool = False,
           worker_init_fn: Callable[[int], None] | None = None) -> Path:
    """This node's cache of ``index`` at ``size`` (shorter side resized to ``resize``, default
    ``size``, then centre-cropped), built first if missing; ``reduced``: JPEGs decoded at a DCT
    scale that keeps that side (data.reduced_decode, part of the key). Every rank calls this; every local rank of
    a node that builds decodes a share, with ``workers`` loader workers set up by ``worker_init_fn``
    (the training loaders' one: they ignore the stop signals). A failure on any rank fails all."""
    fit = ImageTransform(size, resize=resize, interpolation=interpolation)
    env = dist.env
    builder = _NodeBuilder(index, size, folder) if env.is_local_main else None
    try:
        with dist.waiting("every local rank to fingerprint its share of the files (decoded cache key)"):
            parts = dist.all_ok(lambda: file_digests(index, env.local_rank, env.local_world_size))
            digests = {c: d for node, part in dist.all_gather_object((env.node_rank, parts))
                       if node == env.node_rank for c, d in part.items()}
        key = combine_key(index, size, digests, resize, interpolation, reduced)
        with dist.waiting("local rank 0 of each node to check the decoded cache"):
            mine = dist.all_ok(lambda: builder.prepare(key) if builder is not None else None)
            targets = dist.all_gather_object((env.node_rank, mine))
        target = next(t for node, t in targets if node == env.node_rank and t is not None)
        if target.tmp is not None or any(t is not None and t.tmp is not None for _, t in targets):
            t0 = time.monotonic()
            with dist.waiting("the decoded cache build (every local rank decodes a share)"):
                if target.tmp is not None:
                    mine = dist.all_ok(lambda: _fill(index, fit, target.tmp, env.local_rank, env.local_world_size,
                                                     workers, max_pixels, reduced, worker_init_fn))
                else:
                    mine = dist.all_ok(lambda: [])  # this node has its cache; join the others' collectives
                decoded = time.monotonic() - t0
                chunks = [c for node, part in dist.all_gather_object((env.node_rank, mine))
                          if node == env.node_rank for c in part]
                dist.all_ok(lambda: builder.finish(chunks) if builder is not None else None)
            if target.tmp is not None:
                log.info("data.cache: decoded %d images of %s in %.1f s (%.0f images/s, %d process(es) on the "
                         "node), on disk %.1f s later: %s", len(index), index.root, decoded,
                         len(index) / max(decoded, 1e-9), env.local_world_size, time.monotonic() - t0 - decoded,
                         target.path)
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


def build(index: FolderIndex, size: int, folder: Path, workers: int = 0, resize: int | None = None,
          interpolation: str = "bilinear", max_pixels: int = MAX_IMAGE_PIXELS, reduced: bool = False) -> Path:
    """:func:`ensure` in one process without a process group (tools, tests, benchmarks)."""
    return ensure(index, size, folder, Dist.single(), workers, resize, interpolation, max_pixels, reduced)


def record_path(path: Path) -> Path:
    """The cache's record: what it holds and each chunk's checksum."""
    return path.with_suffix(".json")


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def damage(path: Path, images: int, size: int, sample: int | None = SAMPLE_CHUNKS) -> str | None:
    """Why the cache file ``path`` cannot be trusted, or None: its size, then the checksums of
    ``sample`` chunks spread over it (None: every chunk), against its record."""
    try:
        record = json.loads(record_path(path).read_text())
        chunks = [tuple(c) for c in record["chunks"]]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its record {record_path(path).name} is missing or unreadable"
    have, want = path.stat().st_size, nbytes(images, size)
    if have != want:
        return f"it holds {have:,} bytes where {want:,} were written (truncated or overwritten)"
    if sample is not None and len(chunks) > sample:
        chunks = [chunks[round(i * (len(chunks) - 1) / (sample - 1))] for i in range(sample)]
    per_image = nbytes(1, size)
    with open(path, "rb") as f:
        for start, stop, digest in chunks:
            if _digest(os.pread(f.fileno(), (stop - start) * per_image, start * per_image)) != digest:
                return f"images {start}-{stop - 1} differ from what was written (damaged on disk)"
    return None


def writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _not_writable(folder: Path, why: str | None = None) -> str:
    return (f"data.cache_dir '{folder}' is not writable{f' ({why})' if why else ''}, so the decoded cache cannot "
            f"be built there; set data.cache_dir to a writable folder, or use data.cache=none")


def cache_folder(cfg: DataConfig) -> Path:
    """Where ``data.cache=decoded`` keeps its files: ``data.cache_dir``, else <cache root>/decoded."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "decoded"
