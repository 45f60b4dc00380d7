"""A split of a shard set as a :class:`.sources.SampleSource`: sample ``i`` read by its offset.

:class:`ShardIndex` holds flat numpy arrays (the sample table of :mod:`.shard_format`) and a
:class:`.shard_store.ShardStore`; it pickles as those. Shards are opened lazily in the process that
reads, one file descriptor per shard and process (reopened after a fork), and read with ``pread``.
"""
from __future__ import annotations

import hashlib
import os
import zlib
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import numpy as np
from array import array

from ..errors import DataError, ImageError
from .folder_index import Samples
from .shard_format import SplitIndex, Table, check_header, index_name
from .shard_store import ShardStore

# (pid, shard set, shard, size) -> fd, least recently used first: a forked worker opens its own, and the
# cache is looked up before the store is asked for a path (a remote store's path may mean a fetch)
_fds: "OrderedDict[tuple[int, str, str, int], int]" = OrderedDict()
MAX_OPEN_SHARDS = 64  # per process; past it the least recently read shard is closed


def _close_beyond(limit: int, root: str | None = None, root_limit: int | None = None) -> None:
    """Close this process's least recently read shards past ``limit``, and those of shard set
    ``root`` past ``root_limit`` (others' entries, inherited through a fork, are dropped without
    closing: the parent owns those descriptors' lifetime)."""
    pid = os.getpid()
    for key in [key for key in _fds if key[0] != pid]:
        del _fds[key]
    if root is not None and root_limit is not None:
        mine = [key for key in _fds if key[1] == root]
        for key in mine[:max(0, len(mine) - root_limit)]:
            _close(_fds.pop(key))
    while len(_fds) > limit:
        _close(_fds.popitem(last=False)[1])


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def has_split(store: ShardStore, split: str) -> bool:
    exists = getattr(store, "exists", None)
    if exists is not None:
        return bool(exists(index_name(split)))
    try:
        store.read_small(index_name(split))
        return True
    except DataError:
        return False


class ShardIndex:
    """Samples of one split of a shard set (see :class:`.sources.SampleSource`). Immutable."""

    def __init__(self, store: ShardStore, classes: Sequence[str], shard_names: Sequence[str],
                 shard_sizes: Sequence[int], shard_sha256: Sequence[str], table: Table) -> None:
        self.store = store
        self.root = store.location
        self.classes = tuple(classes)
        self.shard_names = tuple(shard_names)
        self.shard_sizes = tuple(int(s) for s in shard_sizes)
        self.shard_sha256 = tuple(shard_sha256)
        self.table = table
        self._labels = array("i")
        self._labels.frombytes(np.ascontiguousarray(table.label, np.int32).tobytes())

    @classmethod
    def open(cls, store: ShardStore, split: str) -> "ShardIndex":
        where = f"'{store.location}/{index_name(split)}'"
        idx = SplitIndex.from_json(store.read_small(index_name(split)), f"{store.location}/{index_name(split)}")
        # the table's sha256 is not recomputed here (0.2 s at ImageNet's 1.28M samples, twice the
        # start-up target): a table that lies about a sample fails that read's header and crc32 checks
        raw = store.read_small(idx.table)
        table = Table.from_bytes(raw, f"{store.location}/{idx.table}")
        n = sum(s.nsamples for s in idx.shards)
        if len(table.shard) != n:
            raise DataError(f"shard set index {where} lists {n} samples but its table holds {len(table.shard)}; "
                            f"rebuild it with 'ddp-trainer shard --index-only'")
        # the table need not be in shard order (a shuffled set): each shard's count is its column's
        counts = [s.nsamples for s in idx.shards]
        if n and (int(table.shard.min()) < 0 or
                  np.bincount(table.shard, minlength=len(counts)).tolist() != counts):
            raise DataError(f"shard set index {where} and its table disagree on how many samples each shard "
                            f"holds; rebuild it with 'ddp-trainer shard --index-only'")
        return cls(store, idx.classes, [s.name for s in idx.shards], [s.filesize for s in idx.shards],
                   [s.sha256 for s in idx.shards], table)

    def __reduce__(self) -> tuple[Any, ...]:
        return (ShardIndex, (self.store, self.classes, self.shard_names, self.shard_sizes, self.shard_sha256,
                             self.table))

    def __repr__(self) -> str:
        return f"ShardIndex({self.root!r}, {len(self.classes)} classes, {len(self)} samples, " \
               f"{len(self.shard_names)} shards)"

    def __len__(self) -> int:
        return len(self.table.shard)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    @property
    def labels(self) -> Sequence[int]:
        return self._labels

    @property
    def shard_ids(self) -> np.ndarray:
        """Each sample's shard number, in sample order: nondecreasing only for a set placed in the
        tree's order (``shard --no-shuffle``); a shuffled set's shards each hold samples from all over."""
        return self.table.shard

    def storage_order(self) -> np.ndarray:
        """The sample indices in the order their bytes lie: shard by shard, by offset (what a pass
        over every sample reads sequentially, a remote shard fetched once)."""
        return np.lexsort((self.table.offset, self.table.shard))

    def label(self, i: int) -> int:
        return self._labels[i]

    def rel(self, i: int) -> str:
        ends = self.table.rel_ends
        begin = int(ends[i - 1]) if i > 0 else 0
        return self.table.rel_blob[begin:int(ends[i])].tobytes().decode("utf-8", "surrogateescape")

    def _shard_of(self, i: int) -> str:
        return self.shard_names[int(self.table.shard[i])]

    def name(self, i: int) -> str:
        return f"{self.root}/{self._shard_of(i)}:{self.rel(i)}"

    def _fd(self, k: int) -> int:
        key = (os.getpid(), self.root, self.shard_names[k], self.shard_sizes[k])
        fd = _fds.get(key)
        if fd is not None:
            _fds.move_to_end(key)
        else:
            path = self.store.shard_path(self.shard_names[k], self.shard_sizes[k], self.shard_sha256[k])
            try:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    # a remote store's cache may have evicted it between the store's answer and this
                    # open (another process of the node, past its grace period): ask once more
                    path = self.store.shard_path(self.shard_names[k], self.shard_sizes[k], self.shard_sha256[k])
                    fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise DataError(f"shard '{path}' cannot be opened ({exc.strerror}); restore it or rebuild the "
                                f"shard set") from None
            size = os.fstat(fd).st_size
            if size != self.shard_sizes[k]:
                os.close(fd)
                raise DataError(f"shard '{path}' is {size} bytes, its index says {self.shard_sizes[k]}: it was "
                                f"changed or truncated; restore it or rebuild the shard set")
            _fds[key] = fd
            # a remote store's cache frees an evicted shard's disk only once it is closed: it sets a
            # lower limit for its set (RemoteShardStore.open_shards)
            _close_beyond(MAX_OPEN_SHARDS, self.root, getattr(self.store, "open_shards", None))
        return fd

    def read(self, i: int) -> bytes:
        """Sample ``i``'s bytes, checked: the tar header before them declares this size, and their
        crc32 is the one indexed. ImageError naming the shard and member otherwise."""
        t = self.table
        offset, size = int(t.offset[i]), int(t.size[i])
        fd = self._fd(int(t.shard[i]))
        try:
            got = os.pread(fd, size + 512, offset - 512)
        except OSError as exc:
            raise ImageError(f"image {self.name(i)!r} cannot be read ({exc.strerror})") from None
        if len(got) != size + 512:
            raise ImageError(f"image {self.name(i)!r} cannot be read: its shard ends before the member does "
                             f"(truncated); restore the shard or rebuild the shard set")
        why = check_header(got[:512], size)
        if why is not None:
            raise ImageError(f"image {self.name(i)!r} is not the indexed member ({why}, at offset {offset}): the "
                             f"shard was changed; restore it or write its index again")
        data = got[512:]
        if zlib.crc32(data) != int(t.crc[i]):
            raise ImageError(f"image {self.name(i)!r}: its bytes do not match the index (crc32 differs): the "
                             f"shard is damaged; restore it or rebuild the shard set")
        return data

    @property
    def samples(self) -> "_Samples":
        """``(relative name, label)`` pairs as a read-only sequence, made on access (as FolderIndex's)."""
        return _Samples(self)

    def change_marks(self, lo: int, hi: int) -> list[str]:
        t = self.table
        return [f"{self.rel(i)}\t{self._labels[i]}\t{self.shard_sha256[int(t.shard[i])]}\t{int(t.offset[i])}\t"
                f"{int(t.size[i])}\n" for i in range(lo, hi)]

    def fingerprint(self) -> dict[str, Any]:
        h = hashlib.sha256()
        h.update("\n".join(f"{self.rel(i)}\t{self._labels[i]}" for i in range(len(self)))
                 .encode("utf-8", "surrogateescape"))
        return {"count": len(self), "sha256": h.hexdigest()}

    def subset(self, keep: Sequence[int]) -> "ShardIndex":
        k = np.asarray(keep, dtype=np.int64)
        t = self.table
        rels = [self.rel(int(i)) for i in k]
        sub = Table.build(t.shard[k], t.offset[k], t.size[k], t.label[k], t.crc[k], rels)
        return ShardIndex(self.store, self.classes, self.shard_names, self.shard_sizes, self.shard_sha256, sub)

    def without(self, bad_rels: set[str]) -> "ShardIndex":
        return self.subset([i for i in range(len(self)) if self.rel(i) not in bad_rels])


class _Samples(Samples):
    """A ShardIndex's ``(relative name, label)`` pairs: FolderIndex's sequence, read through rel/label."""

    __slots__ = ()

    def __iter__(self) -> Iterator[tuple[str, int]]:
        index = self._index
        return ((index.rel(i), index.label(i)) for i in range(len(index)))
