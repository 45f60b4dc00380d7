"""What the last scan of a split folder found, remembered between starts (``data.index_cache``).

Listing 1,000 class folders of 1,281 files each is most of a start-up at ImageNet scale, more on a
shared filesystem where every listing is a round trip. A directory's modification time changes
whenever an entry is added to it, removed from it or renamed in it, so a directory whose mtime is
what it was at the last scan still holds the same names: its listing can be reused. One file per
split folder (under ``<cache root>/index``) keeps, per class folder, every directory the scan
walked (with its mtime) and the image names found; the next scan stats those directories instead
of listing them, and lists again only a class folder in which one of them changed (the split
folder itself likewise, for class folders added or removed).

Two guards keep a stale listing out: a directory whose mtime lies within :data:`RACY_NS` of the
scan that recorded it is listed again next time (a file added in the same clock tick as the scan
would not move the mtime: the "racy git" problem; coarse timestamps on some filesystems), and a
memory file that does not parse, names another folder or another format is ignored. File contents
are not the index's business (the decoded cache checks every file's size and mtime itself).
Failing to write the memory only costs the next start its speed: a warning, never an error.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..fsutil import atomic_write

if TYPE_CHECKING:
    from .folder_index import FolderIndex

log = logging.getLogger("ddp_trainer")

FORMAT = 1
MAGIC = b"ddp_trainer.tree_memory\n"
RACY_NS = 2_000_000_000  # mtimes this close to the recording scan are not trusted (FAT: 2 s ticks)


class TreeMemory:
    """The remembered scan of one split folder. :meth:`unchanged` says which class folders need no
    listing; :meth:`whole` gives the remembered index itself when none does; :meth:`save` writes
    what this scan found."""

    def __init__(self, memory_dir: Path, folder: Path,
                 make_index: Callable[[str, tuple[str, ...], bytes, array, array], FolderIndex]) -> None:
        """``make_index(root, classes, paths, ends, labels)`` builds an index from the stored buffers
        (``FolderIndex._from_buffers``: passed in, as that module imports this one)."""
        self.folder = str(folder.resolve())
        self._make_index = make_index
        key = hashlib.sha256(self.folder.encode("utf-8", "surrogateescape")).hexdigest()[:24]
        self.path = memory_dir / f"{key}.tree"
        self.started_ns = time.time_ns()
        self._old_scanned_ns = 0
        self._old_top: tuple[int, list[str]] | None = None
        self._old_dirs: dict[str, list[tuple[str, int]]] = {}
        self._old_span: dict[str, tuple[int, int]] = {}  # class -> its entries [first, stop) in the old index
        self._old_index: FolderIndex | None = None
        self._top: tuple[int, list[str]] | None = None
        self._dirs: dict[str, list[tuple[str, int]]] = {}
        self.reused = self.listed = 0  # class folders taken from memory / listed again
        self._read()

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                if f.read(len(MAGIC)) != MAGIC:
                    return
                (size,) = struct.unpack("<Q", f.read(8))
                head = json.loads(f.read(size))
                if head.get("format") != FORMAT or head.get("folder") != self.folder:
                    return
                n, paths_size = int(head["entries"]), int(head["paths_bytes"])
                ends, labels = array("q"), array("i")
                ends.frombytes(f.read(8 * n))
                labels.frombytes(f.read(4 * n))
                paths = f.read(paths_size)
                if len(ends) != n or len(labels) != n or len(paths) != paths_size or f.read(1):
                    return  # cut short or padded: not what was written
            top_mtime, top_names = head["top"]
            table = head["classes"]
            spans, first = {}, 0
            for name, dirs, count in table:
                spans[name] = (first, first + int(count))
                first += int(count)
            if first != n:
                return
            self._old_index = self._make_index(self.folder, tuple(name for name, _, _ in table), paths, ends, labels)
            self._old_dirs = {name: [(d, int(m)) for d, m in dirs] for name, dirs, _ in table}
            self._old_span = spans
            self._old_top = (int(top_mtime), list(top_names))
            self._old_scanned_ns = int(head["scanned_ns"])
        except (OSError, ValueError, TypeError, KeyError, struct.error):
            self._old_index, self._old_dirs, self._old_span, self._old_top = None, {}, {}, None

    def _trusted(self, recorded_ns: int, now_ns: int) -> bool:
        return recorded_ns == now_ns and recorded_ns < self._old_scanned_ns - RACY_NS

    def class_folders(self, folder: Path, list_them: Callable[[Path], list[str]]) -> list[str]:
        """The split folder's class folder names: remembered when its mtime is unchanged, else
        ``list_them(folder)``."""
        mtime = os.stat(folder).st_mtime_ns
        if self._old_top is not None and self._trusted(self._old_top[0], mtime):
            names = self._old_top[1]
        else:
            names = list_them(folder)
        self._top = (mtime, names)
        return names

    def unchanged(self, name: str, folder: Path) -> bool:
        """Whether class folder ``name`` and every directory below it that the last scan walked
        still have the mtimes it recorded (a stat each, no listing)."""
        dirs = self._old_dirs.get(name)
        if not dirs:
            return False
        try:
            return all(self._trusted(mtime, os.stat(os.path.join(folder, rel)).st_mtime_ns) for rel, mtime in dirs)
        except OSError:
            return False

    def whole(self, names: list[str]) -> FolderIndex | None:
        """The remembered index, when it holds exactly ``names`` in this order (all unchanged)."""
        old = self._old_index
        if old is None or list(old.classes) != names:
            return None
        for name in names:
            self.reuse(name)
        return old

    def files(self, name: str) -> list[str]:
        """Class ``name``'s remembered image paths, relative to its folder."""
        assert self._old_index is not None
        first, stop = self._old_span[name]
        cut = len(name) + 1
        return [self._old_index.rel(i)[cut:] for i in range(first, stop)]

    def reuse(self, name: str) -> None:
        self._dirs[name] = self._old_dirs[name]
        self.reused += 1

    def listed_again(self, name: str, dirs: list[tuple[str, int]]) -> None:
        self._dirs[name] = dirs
        self.listed += 1

    def save(self, index: FolderIndex) -> None:
        """Remember ``index`` and the directories walked for it (when anything was listed), atomically;
        a failure only warns."""
        if self.listed == 0 and self._top == self._old_top and self._old_index == index:
            return
        assert self._top is not None
        counts = Counter(index.labels)
        head = {"format": FORMAT, "folder": self.folder, "scanned_ns": self.started_ns, "top": list(self._top),
                "classes": [[name, self._dirs[name], counts.get(k, 0)] for k, name in enumerate(index.classes)],
                "entries": len(index), "paths_bytes": len(index._paths)}
        raw = json.dumps(head).encode("ascii")  # non-ASCII names are escaped (surrogates included)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.path) as f:
                f.write(MAGIC)
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                f.write(index._ends.tobytes())
                f.write(index._labels.tobytes())
                f.write(index._paths)
        except OSError as exc:
            log.warning("data.index_cache: could not remember the scan of %s in %s (%s); the next start scans "
                        "it again", self.folder, self.path, exc.strerror or exc)
