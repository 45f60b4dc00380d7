"""Where a shard set's files are: a local or shared folder here, object storage in ``.remote_shards``.

A :class:`ShardStore` is what :class:`.shard_set.ShardIndex` reads through: the small index files
whole, and each shard as a local path it can pread. Stores pickle (loader workers and rank 0's
broadcast carry them).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from ..errors import DataError
from .demo import cache_root

URL_SCHEMES = ("s3://", "gs://", "http://", "https://")


class ShardStore(Protocol):
    location: str  # what messages name: the folder or URL of the shard set

    def read_small(self, name: str) -> bytes:
        """The whole of the set's small file ``name`` (an index file); DataError naming it if missing."""

    def shard_path(self, name: str, size: int, sha256: str) -> str:
        """A local path to shard ``name`` holding exactly ``size`` bytes with that ``sha256``."""


class LocalShardStore:
    """A shard set in a folder of a local or shared filesystem: shards are read in place. A shard's
    size is checked when a process first opens it (``ShardIndex``); its sha256 is not recomputed per
    open (each sample's crc32 is checked on every read instead)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = str(Path(folder).expanduser().resolve())
        self.location = self.folder

    def __reduce__(self) -> tuple[Any, ...]:
        return (LocalShardStore, (self.folder,))

    def __repr__(self) -> str:
        return f"LocalShardStore({self.folder!r})"

    def read_small(self, name: str) -> bytes:
        path = os.path.join(self.folder, name)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise DataError(f"shard set file '{path}' cannot be read ({exc.strerror}); rebuild the index with "
                            f"'ddp-trainer shard --index-only'") from None

    def shard_path(self, name: str, size: int, sha256: str) -> str:
        return os.path.join(self.folder, name)

    def exists(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.folder, name))


def is_url(root: str) -> bool:
    return root.startswith(URL_SCHEMES)


def open_store(root: str, cfg: Any) -> ShardStore:
    """The store of the shard set at ``root``: a folder, or an ``s3://``/``gs://``/``http(s)://`` URL
    (``data.shard_cache_dir`` / ``data.shard_cache_bytes`` configure the node's cache of those)."""
    if not is_url(root):
        return LocalShardStore(root)
    try:
        # the optional extras s3/gcs/http: loaded only for a URL, so a local set needs none of them
        from .remote_shards import RemoteShardStore  # type: ignore[import-not-found]
    except ImportError as exc:
        raise DataError(f"data.root={root} needs object storage support, which cannot be loaded ({exc}); "
                        f"install it with pip install -e \".[s3]\" (or gcs, http)") from None
    cache_dir = getattr(cfg, "shard_cache_dir", None)
    # a process keeps two windows of its shards open (the one it reads, the next): no more, so that
    # the shards it no longer reads leave the cache's disk when they are evicted
    window = getattr(cfg, "shard_window", None)
    return RemoteShardStore(root, Path(cache_dir).expanduser() if cache_dir else cache_root() / "shards",
                            getattr(cfg, "shard_cache_bytes", None), 2 * window if window else None)
