"""``ddp-trainer shard``: a class-folder tree as a shard set, and ``--index-only``: the index of
shards written elsewhere (webdataset's ``ShardWriter``, ``tarp``).

Written with a checkpoint's care: each shard lands whole (temporary file, fsync, rename) with a
record of what it holds (``.S-000000.tar.done.json``); a rerun after a kill keeps the complete shards
whose record matches the plan and writes the rest; the index lands last. The source tree is only
read.

Placement and order are two things. The samples are *placed* in the shards in a permutation of the
tree's order drawn from a seed (:func:`placement`; ``shuffle_seed=None``: the tree's order), so a
shard holds samples of many classes and a reader of a few shards at a time (``shard_window``,
webdataset) sees mixed batches. The set's sample *order* stays the tree's: entry ``i`` of the sample
table is file ``i`` of the tree and points at the shard and offset it was placed at, so sample
``i`` of the set is sample ``i`` of the tree whatever the placement. The plan (which samples go in
which shard, in what order) is a pure function of the tree and the seed: a rerun, with any
``--workers``, writes the same bytes, and a killed run's complete shards are kept.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from ..fsutil import atomic_write, atomic_write_bytes
from .folder_index import IMAGE_EXTENSIONS, check_same_classes, scan
from .shard_format import (ShardEntry, Table, index_json, index_name, sha256_file, shard_name,
                           TABLE_SUFFIX, member_key, member_header, split_member, padded, END_OF_ARCHIVE)

log = logging.getLogger("ddp_trainer")

DEFAULT_SHARD_SIZE = 512 * 1024 * 1024
DEFAULT_SHUFFLE_SEED = 0  # shuffled placement unless --no-shuffle: see the README's Shard sets
_MASK64 = (1 << 64) - 1
_MEMBER_OVERHEAD = 3 * 512  # the image's header and padding, the .cls member's header and block


class _Hashing:
    """A write-only file that hashes and counts what passes through."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.pos = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.f.write(data)
        self.sha.update(data)
        self.pos += len(data)
        return len(data)


def placement(seed: int, n: int) -> np.ndarray:
    """The order in which samples ``0..n-1`` of a tree are placed in the shards under ``--shuffle
    seed``: a permutation, a pure function of ``(seed, n)``, defined here rather than by a library's
    generator (numpy does not promise a ``Generator``'s stream across versions, and the plan is part
    of what a rerun, on another machine, must reproduce to keep a killed run's shards). Sample
    ``i``'s key is splitmix64's output for ``seed + (i + 1) * golden``, distinct for distinct ``i``
    (splitmix64 is a bijection), and the permutation sorts the keys."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed & _MASK64) + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return np.argsort(z, kind="stable").astype(np.int64)


def _describe(seed: int | None) -> str:
    return "in the tree's order" if seed is None else f"shuffled by --shuffle {seed}"


def _placed_with(out: Path, split: str) -> tuple[int | None, str] | None:
    """``(seed, where it is recorded)`` of what ``out`` already holds of ``split`` (its index, else a
    killed run's shard records); None when it holds nothing of it (or an index of foreign shards)."""
    try:
        ours = json.loads((out / index_name(split)).read_text())["ddp_trainer"]
        if "shuffle_seed" in ours:
            return ours["shuffle_seed"], f"its {index_name(split)}"
        # written before placement was recorded (the tree's order), or by --index-only
        return None, f"its {index_name(split)}, which records no shuffle seed"
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none, or unreadable: it is written again
    for record in sorted(out.glob(f".{split}-*.tar.done.json")):
        try:
            return json.loads(record.read_text()).get("shuffle_seed"), f"a killed run's {record.name}"
        except (OSError, ValueError, AttributeError):
            continue
    return None


def _plan_key(items: Sequence[tuple[str, int]]) -> str:
    return hashlib.sha256("\n".join(f"{r}\t{l}" for r, l in items).encode("utf-8", "surrogateescape")).hexdigest()


def _write_shard(src: str, out: str, name: str, items: list[tuple[str, int]],
                 shuffle_seed: int | None = None) -> dict[str, Any]:
    """Shard ``name`` of ``items`` (rel, label) read from folder ``src``; its record (also on disk)."""
    final = Path(out) / name
    record_path = Path(out) / f".{name}.done.json"
    offsets, sizes, crcs = [], [], []
    taken: set[str] = set()
    try:
        with atomic_write(final) as f:  # a killed run leaves only a temporary file (removed by the next)
            sink = _Hashing(f)
            for rel, label in items:
                with open(os.path.join(src, rel), "rb") as img:
                    data = img.read()
                key, ext = member_key(rel, taken), os.path.splitext(rel)[1]
                sink.write(member_header(key + ext, len(data)))
                offsets.append(sink.pos)
                sizes.append(len(data))
                crcs.append(zlib.crc32(data))
                sink.write(data + b"\0" * (padded(len(data)) - len(data)))
                cls = str(label).encode()
                sink.write(member_header(key + ".cls", len(cls)) + cls + b"\0" * (padded(len(cls)) - len(cls)))
            sink.write(END_OF_ARCHIVE)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DataError(f"shard: the disk of '{out}' is full while writing {name}; free space (the whole set "
                            f"needs about the size of the tree) and run the same command again: complete shards "
                            f"are kept") from None
        raise DataError(f"shard: cannot write '{final}' ({exc.strerror}); {exc.filename or ''}") from None
    record = {"plan": _plan_key(items), "shuffle_seed": shuffle_seed, "nsamples": len(items), "filesize": sink.pos,
              "sha256": sink.sha.hexdigest(), "offset": offsets, "size": sizes, "crc": crcs}
    atomic_write_bytes(record_path, json.dumps(record).encode())
    return record


def _done(out: Path, name: str, items: list[tuple[str, int]]) -> dict[str, Any] | None:
    """The record of a complete shard ``name`` that holds ``items``, else None."""
    try:
        record = json.loads((out / f".{name}.done.json").read_text())
        if record["plan"] == _plan_key(items) and (out / name).stat().st_size == record["filesize"]:
            return record
    except (OSError, ValueError, KeyError):
        pass
    return None


def write_split(src: Path, out: Path, split: str, classes: Sequence[str] | None, shard_size: int,
                workers: int, shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED) -> Any:
    """Shards and index of the tree ``src`` as split ``split`` in ``out``, its samples placed by
    ``shuffle_seed`` (None: in the tree's order); returns its FolderIndex."""
    index = scan(src, classes)
    n = len(index)
    # what a killed writer left half-written (fsutil's temporary names): shards, their records, the index
    for pattern in (f".{split}-*.tmp-*", f"..{split}-*.tmp-*", f".{split}.*.tmp-*"):
        for stale in out.glob(pattern):  # (one writer per OUT at a time)
            stale.unlink(missing_ok=True)
    sizes = [os.stat(index.path(i)).st_size for i in range(n)]
    placed = np.arange(n, dtype=np.int64) if shuffle_seed is None else placement(shuffle_seed, n)
    # the plan: each shard's samples (tree indices, in the order written), cut by size in placement order
    plans: list[list[int]] = [[]]
    planned = [0]  # each shard's bytes, headers counted (an upper bound: the space still needed)
    for i in placed.tolist():
        if plans[-1] and planned[-1] + sizes[i] + _MEMBER_OVERHEAD > shard_size:
            plans.append([])
            planned.append(0)
        plans[-1].append(i)
        planned[-1] += sizes[i] + _MEMBER_OVERHEAD
    items = [[(index.rel(i), index.label(i)) for i in p] for p in plans]
    names = [shard_name(split, k) for k in range(len(plans))]
    records: list[dict[str, Any] | None] = [_done(out, nm, it) for nm, it in zip(names, items)]
    todo = [k for k, r in enumerate(records) if r is None]
    needed = sum(planned[k] + 1024 for k in todo)
    free = shutil.disk_usage(out).free
    if needed > free:
        raise DataError(f"shard: '{out}' has {free / 1e9:.2f} GB free, the {len(todo)} shard(s) still to write for "
                        f"{split} need {needed / 1e9:.2f} GB; free {(needed - free) / 1e9:.2f} GB or choose "
                        f"another OUT")
    if len(todo) < len(plans):
        log.info("shard: %s: %d complete shard(s) kept, %d to write", split, len(plans) - len(todo), len(todo))
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("fork")) as pool:
            futures = {k: pool.submit(_write_shard, str(src), str(out), names[k], items[k], shuffle_seed)
                       for k in todo}
            for k, fut in futures.items():
                records[k] = fut.result()
    else:
        for k in todo:
            records[k] = _write_shard(str(src), str(out), names[k], items[k], shuffle_seed)
    done = [r for r in records if r is not None]
    # the table in the tree's order: entry i points at wherever tree sample i was placed
    where = np.fromiter((i for p in plans for i in p), np.int64, n)
    shard_col, offsets = np.empty(n, np.int32), np.empty(n, np.int64)
    lengths, crcs = np.empty(n, np.int64), np.empty(n, np.uint32)
    shard_col[where] = np.repeat(np.arange(len(plans), dtype=np.int32), [len(p) for p in plans])
    offsets[where] = np.fromiter((o for r in done for o in r["offset"]), np.int64, n)
    lengths[where] = np.fromiter((z for r in done for z in r["size"]), np.int64, n)
    crcs[where] = np.fromiter((c for r in done for c in r["crc"]), np.uint32, n)
    table = Table.build(shard_col, offsets, lengths, list(index.labels), crcs, [index.rel(i) for i in range(n)])
    _write_index(out, split, index.classes,
                 [ShardEntry(nm, r["nsamples"], r["filesize"], r["sha256"]) for nm, r in zip(names, done)], table,
                 from_tree=True, shuffle_seed=shuffle_seed)
    for nm in names:
        (out / f".{nm}.done.json").unlink(missing_ok=True)
    return index


def _write_index(out: Path, split: str, classes: Sequence[str], shards: Sequence[ShardEntry], table: Table,
                 from_tree: bool = False, shuffle_seed: int | None = None) -> None:
    raw = table.to_bytes()
    table_name = split + TABLE_SUFFIX
    atomic_write_bytes(out / table_name, raw)
    atomic_write_bytes(out / index_name(split), index_json(split, classes, shards, table_name,
                                                     hashlib.sha256(raw).hexdigest(), from_tree, shuffle_seed))


def shard_tree(data_root: str | Path, out: str | Path, shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 1,
               splits: Sequence[str] = ("train", "val"), classes: Sequence[str] | None = None,
               shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED) -> dict[str, int]:
    """Every split folder of ``data_root`` (of ``splits``) as shards in ``out``, samples placed by
    ``shuffle_seed`` (None: in the tree's order); samples per split. An ``out`` holding a split (or
    a killed run's shards of one) placed by another seed is refused before anything is written."""
    root = Path(data_root).expanduser()
    present = [s for s in splits if (root / s).is_dir()]
    if not present:
        raise DataError(f"shard: '{root}' has none of {', '.join(s + '/' for s in splits)}; give the folder that "
                        f"holds them")
    if shard_size < 1024:
        raise DataError(f"shard: --shard-size {shard_size} is too small; use at least 1024 bytes (default 512 MB)")
    out = Path(out).expanduser()
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise DataError(f"shard: OUT '{out}' is inside DATA_ROOT '{root}'; the source tree is only read: "
                        f"choose a folder outside it")
    if shuffle_seed is not None and not 0 <= shuffle_seed <= _MASK64:
        raise DataError(f"shard: --shuffle {shuffle_seed}: use a seed from 0 to 2**64 - 1")
    out.mkdir(parents=True, exist_ok=True)
    for split in present:
        found = _placed_with(out, split)
        if found is not None and found[0] != shuffle_seed:
            seed, where = found
            flag = "--no-shuffle" if seed is None else f"--shuffle {seed}"
            raise DataError(f"shard: '{out}' holds split {split!r} placed {_describe(seed)} ({where}), this run "
                            f"would place them {_describe(shuffle_seed)}: run with {flag} to finish or rewrite it, or give "
                            f"another OUT (the two would be mixed)")
    counts: dict[str, int] = {}
    first = None
    for split in present:
        index = write_split(root / split, out, split, classes if first is None else first.classes, shard_size,
                            workers, shuffle_seed)
        if first is None:
            first = index
        else:
            check_same_classes(first, index, str(root / split))
        counts[split] = len(index)
    return counts


def index_only(shards: Sequence[str | Path], classes: Sequence[str] | None = None) -> tuple[Path, str, int]:
    """Build the index of foreign ``shards`` (one folder, one split ``S-*.tar``) in one pass over
    each; labels from ``.cls`` (class index), else ``.txt`` / ``.json`` (a class name, or
    ``{"label": ...}``) mapped through ``classes``. Returns (folder, split, samples)."""
    paths = sorted(Path(s).expanduser() for s in shards)
    if not paths:
        raise DataError("shard --index-only: name the shards (for example OUT/train-*.tar)")
    folder = paths[0].parent
    if any(p.parent != folder for p in paths):
        raise DataError(f"shard --index-only: the shards must share one folder (got '{folder}' and others)")
    m = re.match(r"^(.*?)[-_.]?\d+\.tar$", paths[0].name)
    split = m.group(1) if m and m.group(1) else paths[0].stem
    names = list(classes) if classes else None
    mapping = {c: k for k, c in enumerate(names)} if names else {}
    shard_col, offsets, sizes, labels, crcs, rels, entries = [], [], [], [], [], [], []
    for k, path in enumerate(paths):
        count = 0
        groups: dict[str, dict[str, Any]] = {}
        order: list[str] = []
        try:
            with tarfile.open(path, "r:") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    parts = split_member(member.name)  # webdataset's grouping
                    if parts is None:
                        continue
                    key, ext = parts[0], parts[1].lower()
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    f = tf.extractfile(member)
                    data = f.read() if f is not None else b""
                    if "." + ext in IMAGE_EXTENSIONS:
                        groups[key]["image"] = (member.name, member.offset_data, member.size, zlib.crc32(data))
                    elif ext in ("cls", "txt", "json"):
                        groups[key][ext] = data
        except (OSError, tarfile.TarError) as exc:
            raise DataError(f"shard --index-only: '{path}' is not a readable tar file ({exc})") from None
        for key in order:
            g = groups[key]
            if "image" not in g:
                raise DataError(f"shard --index-only: '{path}' sample {key!r} has no image member "
                                f"({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
            label = _label(g, key, path, mapping, names)
            name, off, size, crc = g["image"]
            shard_col.append(k)
            offsets.append(off)
            sizes.append(size)
            labels.append(label)
            crcs.append(crc)
            rels.append(name)
            count += 1
        entries.append(ShardEntry(path.name, count, path.stat().st_size, sha256_file(path)))
    if names is None:
        top = max(labels, default=-1)
        names = [str(c) for c in range(top + 1)]
    bad = [lab for lab in labels if not 0 <= lab < len(names)]
    if bad:
        raise DataError(f"shard --index-only: class index {bad[0]} is outside the {len(names)} classes of "
                        f"--classes; give a --classes file that names every class")
    _write_index(folder, split, names, entries, Table.build(shard_col, offsets, sizes, labels, crcs, rels))
    return folder, split, len(labels)


def _label(g: dict[str, Any], key: str, path: Path, mapping: dict[str, int], names: list[str] | None) -> int:
    try:
        if "cls" in g:
            return int(g["cls"].decode().strip())
        if "txt" in g or "json" in g:
            value = g["txt"].decode().strip() if "txt" in g else json.loads(g["json"])
            if isinstance(value, dict):
                value = value.get("label", value.get("cls"))
            if isinstance(value, int):
                return value
            if names is None:
                raise DataError(f"shard --index-only: '{path}' labels samples by class name ({value!r}); give "
                                f"--classes FILE.json with the list of class names")
            if value not in mapping:
                raise DataError(f"shard --index-only: '{path}' sample {key!r} has class {value!r}, which is not "
                                f"in --classes; add it")
            return mapping[value]
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"shard --index-only: '{path}' sample {key!r} has an unreadable label ({exc})") from None
    raise DataError(f"shard --index-only: '{path}' sample {key!r} has no .cls, .txt or .json label")
