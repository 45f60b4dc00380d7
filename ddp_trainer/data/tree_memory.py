"""What the last scan of a split folder found, remembered between starts (``data.index_cache``).

Listing 1,000 class folders of 1,281 files each is most of a start-up at ImageNet scale, more on a
shared filesystem where every listing is a round trip. A directory's modification time changes
whenever an entry is added to it, removed from it or renamed in it, so a directory whose mtime is
what it was at the last scan still holds the same names: its listing can be reused. One file per
split folder (under ``<cache root>/index``) keeps, per class folder, every directory the scan
walked (with its mtime) and the image names found; the next scan stats those directories instead
of listing them, and lists again only a class folder in which one of them changed (the split
folder itself likewise, for class folders added or removed).

Two guards keep a stale listing out. A listing is trusted next time only when it is *settled*: made
after the clock tick of its directory's mtime had ended (a file added in the same tick as the scan
would not move the mtime: the "racy git" problem; coarse timestamps on some filesystems). Mtimes are
the file server's clock, which may be seconds off this machine's, so they are compared only with
the server's own times, never with ``time.time()``: a directory is settled when its mtime is older
than :data:`RACY_NS` before the scan started by the server's clock, read as the mtime of a file the
scan creates in the memory folder when that folder is on the same filesystem; or else when an
earlier scan on this host, ended at least :data:`RACY_NS` before this one started, had seen the same
mtime (a duration of this machine's clock, whatever the server's says). So with the memory on
another filesystem than the data, a directory's listing is reused from the third start on. And a
memory file that does not parse, whose recorded lengths do not fit its size, that names another
folder or another format is ignored (a damaged one with a warning) and written again. File contents
are not the index's business (the decoded cache checks every file's size and mtime itself).
Failing to write the memory only costs the next start its speed: a warning, never an error.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..fsutil import atomic_write

if TYPE_CHECKING:
    from .folder_index import FolderIndex

log = logging.getLogger("ddp_trainer")

FORMAT = 2  # 2: each directory's "settled" flag; the recording host and end time
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
        self.host = os.uname().nodename
        self._server_start_ns = _server_now(memory_dir, folder)  # None: no file on the data's filesystem
        self._gap_ok = False  # the last scan ended, on this host, RACY_NS or more before this one started
        self._old_top: tuple[int, list[str], bool] | None = None
        self._old_dirs: dict[str, list[tuple[str, int, bool]]] = {}
        self._old_mtimes: dict[str, int] = {}  # every directory the last scan recorded -> its mtime
        self._old_span: dict[str, tuple[int, int]] = {}  # class -> its entries [first, stop) in the old index
        self._old_index: FolderIndex | None = None
        self._top: tuple[int, list[str], bool] | None = None
        self._dirs: dict[str, list[tuple[str, int, bool]]] = {}
        self.reused = self.listed = 0  # class folders taken from memory / listed again
        self._read()

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                if f.read(len(MAGIC)) != MAGIC:
                    return self._damaged("not a memory file")
                left = os.fstat(f.fileno()).st_size - len(MAGIC) - 8
                (size,) = struct.unpack("<Q", f.read(8))
                if size > left:  # every length is checked against the file before it is read
                    return self._damaged("its header is longer than the file")
                head = json.loads(f.read(size))
                if head.get("format") != FORMAT or head.get("folder") != self.folder:
                    return
                n, paths_size = int(head["entries"]), int(head["paths_bytes"])
                if n < 0 or paths_size < 0 or 12 * n + paths_size != left - size:
                    return self._damaged(f"it records {n} entries and {paths_size} path bytes, which do not "
                                         f"fit its size")
                ends, labels = array("q"), array("i")
                ends.frombytes(f.read(8 * n))
                labels.frombytes(f.read(4 * n))
                paths = f.read(paths_size)
                if len(ends) != n or len(labels) != n or len(paths) != paths_size or f.read(1):
                    return self._damaged("it was cut short or padded")
            top_mtime, top_names, top_settled = head["top"]
            table = head["classes"]
            spans, first = {}, 0
            for name, dirs, count in table:
                spans[name] = (first, first + int(count))
                first += int(count)
            if first != n:
                return self._damaged("its class table does not add up")
            self._old_index = self._make_index(self.folder, tuple(name for name, _, _ in table), paths, ends, labels)
            self._old_dirs = {name: [(d, int(m), bool(s)) for d, m, s in dirs] for name, dirs, _ in table}
            self._old_mtimes = {d: m for dirs in self._old_dirs.values() for d, m, _ in dirs}
            self._old_span = spans
            self._old_top = (int(top_mtime), list(top_names), bool(top_settled))
            self._gap_ok = head["host"] == self.host and self.started_ns - int(head["finished_ns"]) >= RACY_NS
        except (OSError, ValueError, TypeError, KeyError, struct.error) as exc:
            if not isinstance(exc, FileNotFoundError):
                self._damaged(str(exc) or type(exc).__name__)
            self._old_index, self._old_dirs, self._old_span, self._old_top = None, {}, {}, None
            self._old_mtimes, self._gap_ok = {}, False

    def _damaged(self, why: str) -> None:
        log.warning("data.index_cache: %s is damaged (%s); %s is scanned in full and remembered again",
                    self.path, why, self.folder)

    def _settled(self, rel: str | None, mtime: int) -> bool:
        """Whether a listing of directory ``rel`` (None: the split folder) made by this scan, whose
        mtime is ``mtime``, was made after that mtime's clock tick (see the module's docstring)."""
        if self._server_start_ns is not None and mtime < self._server_start_ns - RACY_NS:
            return True  # old by the server's own clock
        seen = self._old_top[0] if rel is None and self._old_top is not None else self._old_mtimes.get(rel or "")
        return self._gap_ok and seen == mtime

    @staticmethod
    def _trusted(settled: bool, recorded_ns: int, now_ns: int) -> bool:
        return settled and recorded_ns == now_ns

    def class_folders(self, folder: Path, list_them: Callable[[Path], list[str]]) -> list[str]:
        """The split folder's class folder names: remembered when its mtime is unchanged, else
        ``list_them(folder)``."""
        mtime = os.stat(folder).st_mtime_ns
        if self._old_top is not None and self._trusted(self._old_top[2], self._old_top[0], mtime):
            names, settled = self._old_top[1], True
        else:
            names, settled = list_them(folder), self._settled(None, mtime)
        self._top = (mtime, names, settled)
        return names

    def unchanged(self, name: str, folder: Path) -> bool:
        """Whether class folder ``name`` and every directory below it that the last scan walked
        still have the mtimes it recorded (a stat each, no listing)."""
        dirs = self._old_dirs.get(name)
        if not dirs:
            return False
        try:
            return all(self._trusted(settled, mtime, os.stat(os.path.join(folder, rel)).st_mtime_ns)
                       for rel, mtime, settled in dirs)
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
        """Class folder ``name`` was listed by this scan: ``dirs`` are the directories walked, with
        the mtimes stated (each after its listing)."""
        self._dirs[name] = [(rel, mtime, self._settled(rel, mtime)) for rel, mtime in dirs]
        self.listed += 1

    def save(self, index: FolderIndex) -> None:
        """Remember ``index`` and the directories walked for it (when anything was listed), atomically;
        a failure only warns."""
        if self.listed == 0 and self._top == self._old_top and self._old_index == index:
            return
        assert self._top is not None
        counts = Counter(index.labels)
        head = {"format": FORMAT, "folder": self.folder, "host": self.host, "scanned_ns": self.started_ns,
                "finished_ns": time.time_ns(), "top": list(self._top),
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


def _server_now(memory_dir: Path, folder: Path) -> int | None:
    """The file server's clock now, as the mtime of a file created (and removed) in ``memory_dir``,
    when that folder is on the same filesystem as ``folder``; else None (or when it cannot be
    written: then nothing is remembered either)."""
    try:
        memory_dir.mkdir(parents=True, exist_ok=True)
        if os.stat(memory_dir).st_dev != os.stat(folder).st_dev:
            return None
        fd, name = tempfile.mkstemp(prefix=".clock-", dir=memory_dir)
        try:
            return os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError:
        return None
