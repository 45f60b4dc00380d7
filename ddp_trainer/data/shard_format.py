"""The on-disk format of a shard set: tar shards in WebDataset's layout, a ``wids`` index and a binary
sample table, per split, in one folder.

A split ``train`` is:

- ``train-000000.tar``, ...: uncompressed tar; per sample ``<key>.<ext>`` (the image's bytes as they
  were) then ``<key>.cls`` (the class index in ASCII decimal). Members are written with a fixed
  mtime, owner and mode, so the same tree always gives the same bytes.
- ``train.index.json``: the ``wids`` shard index (``__kind__``, ``wids_version``, ``name``,
  ``shardlist`` of ``{url, nsamples, filesize}``) plus our key ``ddp_trainer``: the format version,
  the class names, each shard's sha256, the sample table's name and sha256, and for a set written
  from a tree ``shuffle_seed``: the seed its samples were placed in the shards by (null: in the
  tree's order; absent for an index of foreign shards).
- ``train.samples.bin``: the sample table, raw numpy columns (see :meth:`Table.to_bytes`): per sample
  the shard number, the byte offset and size of the image member's data, its crc32, its label, and
  the relative names (one UTF-8 blob and end offsets). Loading it is one read and seven
  ``np.frombuffer`` views, no per-sample work and no copy.

The table's order is the sample order (sample ``i`` of a set written from a tree is file ``i`` of
the tree); the shards' order (what webdataset and wids read) is the order the samples were placed
in. The two differ for a shuffled set: the table is not sorted by shard, and a shard's samples are
not contiguous in it (``shard`` is any column of shard numbers; the per-shard counts of the wids
index are the column's counts).

Everything here is pure format: what is read and written, checked against what. Writing whole files
atomically is :mod:`ddp_trainer.fsutil`'s job; planning and writing shards is :mod:`.shard_writer`'s.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import DataError

VERSION = 1
WIDS_KIND = "wids-shard-index-v1"
TAR_BLOCK = 512
MTIME = 0  # fixed: the same tree gives byte-identical shards (resume and re-runs compare equal)


TABLE_SUFFIX = ".samples.bin"


def index_name(split: str) -> str:
    return f"{split}.index.json"


def table_name(split: str) -> str:
    return split + TABLE_SUFFIX


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


# webdataset splits a member name at the first "." of its base name: key, extension
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$", re.DOTALL)


def split_member(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member the way webdataset groups them; None for a name without."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else None


def member_key(rel: str, taken: set[str]) -> str:
    """The key of the file ``rel`` (its path without the extension); dots left in the base name become
    ``_`` (webdataset would cut the key there) and a key already ``taken`` gets a ``~n`` suffix."""
    stem = os.path.splitext(rel)[0].replace(os.sep, "/")
    head, _, base = stem.rpartition("/")
    key = (head + "/" if head else "") + base.replace(".", "_")
    out, n = key, 1
    while out in taken:
        out, n = f"{key}~{n}", n + 1
    taken.add(out)
    return out


def member_header(name: str, size: int) -> bytes:
    """The tar header block(s) of a regular member ``name`` of ``size`` bytes (PAX records for a long
    or non-ASCII name): deterministic, so a shard's layout is known before it is written."""
    raw = name.encode("ascii", "replace")
    if len(raw) < 100 and raw.decode("ascii") == name and size < 8 ** 11:
        return _ustar(raw, size)  # tarfile's own header, built without its per-call overhead
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, MTIME, 0o444
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _ustar(name: bytes, size: int) -> bytes:
    head = (name.ljust(100, b"\0") + b"0000444\0" + b"0000000\0" * 2 + b"%011o\0" % size + b"%011o\0" % MTIME)
    tail = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (32 * 2 + 16 + 155)
    block = head + b" " * 8 + tail
    block += b"\0" * (TAR_BLOCK - len(block))
    check = b"%06o\0 " % sum(block)
    return block[:148] + check + block[156:]


def padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


END_OF_ARCHIVE = b"\0" * (2 * TAR_BLOCK)


def check_header(block: bytes, size: int) -> str | None:
    """Why the 512-byte ustar header ``block`` (the one just before a member's data) is not that of
    a regular member of ``size`` bytes; None when it is."""
    if len(block) != TAR_BLOCK or block[257:262] != b"ustar":
        return "no tar header before the member's data"
    try:
        stored = tarfile.nti(block[124:136])
    except tarfile.InvalidHeaderError:
        return "a tar header with no size"
    if stored != size:
        return f"the member there holds {stored} bytes, the index says {size}"
    return None


TABLE_MAGIC = b"DDPTTAB1"
_COLUMNS = ("shard", "offset", "size", "crc", "label", "rel_blob", "rel_ends")


@dataclass(frozen=True)
class Table:
    """The sample table of one split, as flat arrays."""

    shard: np.ndarray  # int32, in any order (a shuffled set's samples lie in shards out of order)
    offset: np.ndarray  # int64: the image member's data in its shard
    size: np.ndarray  # int64
    crc: np.ndarray  # uint32: zlib.crc32 of the image's bytes
    label: np.ndarray  # int32
    rel_blob: np.ndarray  # uint8: UTF-8 (surrogateescape) of every relative name, concatenated
    rel_ends: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.shard)

    def to_bytes(self) -> bytes:
        """The raw layout: ``TABLE_MAGIC``, an 8-byte little-endian header length, a JSON header
        ``{column: [dtype, offset, count]}``, then each column's bytes, 64-byte aligned. Read back as
        ``np.frombuffer`` views: no per-column copy or zip CRC (the start-up target at 1.28M samples)."""
        columns = {k: np.ascontiguousarray(getattr(self, k)) for k in _COLUMNS}
        placed: dict[str, list[Any]] = {}
        offset = 0
        for k, arr in columns.items():
            placed[k] = [arr.dtype.str, offset, int(arr.size)]
            offset += -(-arr.nbytes // 64) * 64
        header = json.dumps(placed).encode()
        start = -(-(len(TABLE_MAGIC) + 8 + len(header)) // 64) * 64
        out = bytearray(start + offset)
        out[:len(TABLE_MAGIC)] = TABLE_MAGIC
        out[len(TABLE_MAGIC):len(TABLE_MAGIC) + 8] = len(header).to_bytes(8, "little")
        out[len(TABLE_MAGIC) + 8:len(TABLE_MAGIC) + 8 + len(header)] = header
        for k, arr in columns.items():
            at = start + placed[k][1]
            out[at:at + arr.nbytes] = arr.tobytes()
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "Table":
        try:
            if data[:len(TABLE_MAGIC)] != TABLE_MAGIC:
                raise ValueError("not a ddp_trainer sample table")
            n = int.from_bytes(data[len(TABLE_MAGIC):len(TABLE_MAGIC) + 8], "little")
            placed = json.loads(data[len(TABLE_MAGIC) + 8:len(TABLE_MAGIC) + 8 + n])
            start = -(-(len(TABLE_MAGIC) + 8 + n) // 64) * 64
            cols = {}
            for k in _COLUMNS:
                dtype, offset, count = placed[k]
                cols[k] = np.frombuffer(data, np.dtype(dtype), count, start + offset)
            return cls(**cols)
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"shard set sample table '{where}' cannot be read ({exc}); write the index again "
                            f"with 'ddp-trainer shard --index-only'") from None

    @classmethod
    def build(cls, shard: Sequence[int], offset: Sequence[int], size: Sequence[int], label: Sequence[int],
              crc: Sequence[int], rels: Sequence[str]) -> "Table":
        encoded = [r.encode("utf-8", "surrogateescape") for r in rels]
        ends = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), dtype=np.int64)
        return cls(np.asarray(shard, np.int32), np.asarray(offset, np.int64), np.asarray(size, np.int64),
                   np.asarray(crc, np.uint32), np.asarray(label, np.int32),
                   np.frombuffer(b"".join(encoded), np.uint8), ends)


@dataclass(frozen=True)
class ShardEntry:
    url: str  # the shard's file name in the set's folder (wids' "url", relative to the index)
    nsamples: int
    filesize: int
    sha256: str

    @property
    def name(self) -> str:
        return self.url



@dataclass(frozen=True)
class SplitIndex:
    """What ``<split>.index.json`` says."""

    split: str
    classes: tuple[str, ...]
    shards: tuple[ShardEntry, ...]
    table_name: str
    table_sha256: str
    from_tree: bool = False  # written by ``ddp-trainer shard`` from a tree (not ``--index-only``)
    shuffle_seed: int | None = None  # from_tree: the placement's seed; None: the tree's order

    @property
    def table(self) -> str:
        return self.table_name

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "__kind__": WIDS_KIND, "wids_version": 1, "name": self.split,
            "shardlist": [{"url": s.url, "nsamples": s.nsamples, "filesize": s.filesize} for s in self.shards],
            "ddp_trainer": {"version": VERSION, "classes": list(self.classes),
                            "sha256": [s.sha256 for s in self.shards],
                            "table": self.table_name, "table_sha256": self.table_sha256},
        }
        if self.from_tree:
            doc["ddp_trainer"]["shuffle_seed"] = self.shuffle_seed
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: bytes | str, where: str) -> "SplitIndex":
        def bad(why: str) -> DataError:
            return DataError(f"shard set index '{where}' {why}; write it again with 'ddp-trainer shard "
                             f"--index-only SHARDS...'")
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise bad(f"is not JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("__kind__") != WIDS_KIND:
            raise bad(f"is not a wids shard index (__kind__ {doc.get('__kind__') if isinstance(doc, dict) else None!r})")
        ours = doc.get("ddp_trainer")
        if not isinstance(ours, dict):
            raise bad("has no 'ddp_trainer' key (a plain wids index)")
        if ours.get("version") != VERSION:
            raise bad(f"has format version {ours.get('version')!r}, this ddp_trainer reads {VERSION}")
        try:
            shardlist, sums = doc["shardlist"], ours["sha256"]
            if len(shardlist) != len(sums):
                raise bad("lists a different number of shards and checksums")
            shards = tuple(ShardEntry(str(s["url"]), int(s["nsamples"]), int(s["filesize"]), str(h))
                           for s, h in zip(shardlist, sums))
            seed = ours.get("shuffle_seed")
            return cls(str(doc["name"]), tuple(str(c) for c in ours["classes"]), shards, str(ours["table"]),
                       str(ours["table_sha256"]), "shuffle_seed" in ours, None if seed is None else int(seed))
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"lacks or misstates {exc}") from None


def index_json(split: str, classes: Sequence[str], shards: Sequence[ShardEntry], table: str,
               table_sha256: str, from_tree: bool = False, shuffle_seed: int | None = None) -> bytes:
    return SplitIndex(split, tuple(classes), tuple(shards), table, table_sha256, from_tree,
                      shuffle_seed).to_json().encode()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
