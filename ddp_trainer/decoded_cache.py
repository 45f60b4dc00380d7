"""``data.cache: decoded``: every image decoded and resized once into one memory-mapped uint8 file.

Built by local rank 0 of each node (nodes need not share a filesystem), atomically (a temporary file
renamed into place, so a reader never sees a half-written cache), reused by every rank of the node
and by later runs, and rebuilt when the dataset (paths, sizes, modification times) or the image size
changes: the file name is a hash of all of these.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from .folder_index import FolderIndex
from .transforms import ImageTransform, load_rgb

log = logging.getLogger("ddp_trainer")
VERSION = 1


def cache_key(index: FolderIndex, size: int) -> str:
    h = hashlib.sha256(f"v{VERSION} {size} {index.root}\n".encode())
    for rel, label in index.samples:
        st = os.stat(os.path.join(index.root, rel))
        h.update(f"{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def cache_path(folder: Path, index: FolderIndex, size: int) -> Path:
    return Path(folder) / f"decoded-{cache_key(index, size)}-{len(index)}x3x{size}x{size}.u8"


def build(index: FolderIndex, size: int, folder: Path) -> Path:
    """Write the cache for ``index`` (unless it exists) and return its path. Local rank 0 only."""
    path = cache_path(folder, index, size)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fit = ImageTransform(size)
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(index), 3, size, size))
        for i in range(len(index)):
            arr[i] = fit.fit(load_rgb(index.path(i))).numpy()
        arr.flush()
        del arr
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    (path.with_suffix(".json")).write_text(json.dumps({"root": index.root, "images": len(index), "size": size}))
    log.info("data.cache: decoded %d images of %s into %s", len(index), index.root, path)
    return path


def open_cache(path: Path) -> np.ndarray:
    """The cache as a read-only memory map (shared page cache across the node's processes)."""
    return np.load(path, mmap_mode="r")


class CachedImages:
    """``images[i]`` -> uint8 CHW tensor from the memory-mapped cache (opened lazily in each worker)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._arr: np.ndarray | None = None

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._arr is None:
            self._arr = open_cache(self.path)
        return torch.from_numpy(np.array(self._arr[i]))

    def __getstate__(self) -> dict:
        return {"path": self.path, "_arr": None}  # workers reopen the map instead of pickling it
