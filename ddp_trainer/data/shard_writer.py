"""``ddp-trainer shard``: a class-folder tree as a shard set, and ``--index-only``: the index of
shards written elsewhere (webdataset's ``ShardWriter``, ``tarp``).

Written with a checkpoint's care: each shard lands whole (temporary file, fsync, rename) with a
record of what it holds (``.S-000000.tar.done.json``); a rerun after a kill keeps the complete shards
whose record matches the plan and writes the rest; the index lands last. The source tree is only
read. The samples are written in the folder index's order, so sample ``i`` of the set is sample ``i``
of the tree.
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

from ..errors import DataError
from .folder_index import IMAGE_EXTENSIONS, check_same_classes, scan
from .shard_format import (ShardEntry, Table, index_json, index_name, sha256_file, shard_name, write_atomic,
                           TABLE_SUFFIX, member_key, member_header, split_member, padded, END_OF_ARCHIVE)

log = logging.getLogger("ddp_trainer")

DEFAULT_SHARD_SIZE = 512 * 1024 * 1024
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


def _plan_key(items: Sequence[tuple[str, int]]) -> str:
    return hashlib.sha256("\n".join(f"{r}\t{l}" for r, l in items).encode("utf-8", "surrogateescape")).hexdigest()


def _write_shard(src: str, out: str, name: str, items: list[tuple[str, int]]) -> dict[str, Any]:
    """Shard ``name`` of ``items`` (rel, label) read from folder ``src``; its record (also on disk)."""
    final = Path(out) / name
    record_path = Path(out) / f".{name}.done.json"
    tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
    offsets, sizes, crcs = [], [], []
    taken: set[str] = set()
    try:
        with open(tmp, "wb") as f:
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
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise DataError(f"shard: the disk of '{out}' is full while writing {name}; free space (the whole set "
                            f"needs about the size of the tree) and run the same command again: complete shards "
                            f"are kept") from None
        raise DataError(f"shard: cannot write '{final}' ({exc.strerror}); {exc.filename or ''}") from None
    record = {"plan": _plan_key(items), "nsamples": len(items), "filesize": sink.pos,
              "sha256": sink.sha.hexdigest(), "offset": offsets, "size": sizes, "crc": crcs}
    write_atomic(record_path, json.dumps(record).encode())
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
                workers: int) -> Any:
    """Shards and index of the tree ``src`` as split ``split`` in ``out``; returns its FolderIndex."""
    index = scan(src, classes)
    for pattern in (f".{split}-*.tmp-*", f"{split}.*.tmp-*"):  # what a killed writer left half-written
        for stale in out.glob(pattern):  # (one writer per OUT at a time)
            stale.unlink(missing_ok=True)
    sizes = [os.stat(index.path(i)).st_size for i in range(len(index))]
    plans: list[list[tuple[str, int]]] = [[]]
    filled = 0
    for (rel, label), size in zip(index.samples, sizes):
        if plans[-1] and filled + size + _MEMBER_OVERHEAD > shard_size:
            plans.append([])
            filled = 0
        plans[-1].append((rel, label))
        filled += size + _MEMBER_OVERHEAD
    names = [shard_name(split, k) for k in range(len(plans))]
    records: list[dict[str, Any] | None] = [_done(out, n, p) for n, p in zip(names, plans)]
    todo = [k for k, r in enumerate(records) if r is None]
    # the bytes still to write: the planned shards' sizes (an upper bound, headers counted)
    starts = [0]
    for p in plans:
        starts.append(starts[-1] + len(p))
    needed = sum(sum(sizes[starts[k]:starts[k + 1]]) + _MEMBER_OVERHEAD * len(plans[k]) + 1024 for k in todo)
    free = shutil.disk_usage(out).free
    if needed > free:
        raise DataError(f"shard: '{out}' has {free / 1e9:.2f} GB free, the {len(todo)} shard(s) still to write for "
                        f"{split} need {needed / 1e9:.2f} GB; free {(needed - free) / 1e9:.2f} GB or choose "
                        f"another OUT")
    if len(todo) < len(plans):
        log.info("shard: %s: %d complete shard(s) kept, %d to write", split, len(plans) - len(todo), len(todo))
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("fork")) as pool:
            futures = {k: pool.submit(_write_shard, str(src), str(out), names[k], plans[k]) for k in todo}
            for k, fut in futures.items():
                records[k] = fut.result()
    else:
        for k in todo:
            records[k] = _write_shard(str(src), str(out), names[k], plans[k])
    done = [r for r in records if r is not None]
    shard_col = [k for k, p in enumerate(plans) for _ in p]
    table = Table.build(shard_col, [o for r in done for o in r["offset"]], [s for r in done for s in r["size"]],
                        list(index.labels), [c for r in done for c in r["crc"]],
                        [rel for p in plans for rel, _ in p])
    _write_index(out, split, index.classes,
                 [ShardEntry(n, r["nsamples"], r["filesize"], r["sha256"]) for n, r in zip(names, done)], table)
    for n in names:
        (out / f".{n}.done.json").unlink(missing_ok=True)
    return index


def _write_index(out: Path, split: str, classes: Sequence[str], shards: Sequence[ShardEntry], table: Table) -> None:
    raw = table.to_bytes()
    table_name = split + TABLE_SUFFIX
    write_atomic(out / table_name, raw)
    write_atomic(out / index_name(split), index_json(split, classes, shards, table_name,
                                                     hashlib.sha256(raw).hexdigest()))


def shard_tree(data_root: str | Path, out: str | Path, shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 1,
               splits: Sequence[str] = ("train", "val"), classes: Sequence[str] | None = None) -> dict[str, int]:
    """Every split folder of ``data_root`` (of ``splits``) as shards in ``out``; samples per split."""
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
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    first = None
    for split in present:
        index = write_split(root / split, out, split, classes if first is None else first.classes, shard_size,
                            workers)
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
