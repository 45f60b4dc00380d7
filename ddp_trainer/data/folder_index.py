"""The index of a class-per-folder dataset (``root/dog/*.png``, ``root/cat/*.png``).

Scanning is done once (by rank 0) and the resulting :class:`FolderIndex`, which holds only relative
paths and labels, is broadcast: every rank and node sees the same order.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import operator
import os
import re
from array import array
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, overload

from ..errors import DataError
from ..progress import Ticker
from .images import read_regular_file
from .tree_memory import TreeMemory

log = logging.getLogger("ddp_trainer")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# a visible (no leading "." or "__") file name with one of IMAGE_EXTENSIONS, any case
_IMAGE_NAME = re.compile(r"(?!\.|__).*(?:%s)\Z" % "|".join(re.escape(e) for e in IMAGE_EXTENSIONS),
                         re.IGNORECASE | re.DOTALL)


def _encode(rel: str) -> bytes:
    return rel.encode("utf-8", "surrogateescape")  # file names that are not UTF-8 survive the trip


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class FolderIndex:
    """Samples of one split: ``samples[i] = (path relative to root, class index)``.

    Held in three flat buffers, not one Python tuple per image: the UTF-8 bytes of every relative
    path, their end offsets and the labels. A loader worker forked from a rank reads them without
    touching a per-entry reference count, so their pages stay shared with the rank instead of being
    copied into every worker (pytorch/pytorch#13246: about 180 MB per worker at ImageNet's 1.28M
    entries as tuples). Immutable; pickles as the three buffers (what rank 0 broadcasts).
    """

    __slots__ = ("root", "classes", "_paths", "_ends", "_labels")

    def __init__(self, root: str, classes: Sequence[str], samples: Iterable[tuple[str, int]] = ()) -> None:
        blob, ends, labels = bytearray(), array("q"), array("i")
        for rel, label in samples:
            blob += _encode(rel)
            ends.append(len(blob))
            labels.append(label)
        self._set(root, tuple(classes), bytes(blob), ends, labels)

    def _set(self, root: str, classes: tuple[str, ...], paths: bytes, ends: array, labels: array) -> None:
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "_paths", paths)
        object.__setattr__(self, "_ends", ends)
        object.__setattr__(self, "_labels", labels)

    @classmethod
    def from_classes(cls, root: str, classes: Sequence[str], files: Sequence[Sequence[str]]) -> "FolderIndex":
        """The index of ``files[label]`` (paths relative to each class folder), class by class;
        built with C-level joins (about 0.1 s for ImageNet's 1.28M files)."""
        blob, ends, labels = bytearray(), array("q"), array("i")
        for label, (name, names) in enumerate(zip(classes, files)):
            if not names:
                continue
            prefix = _encode(name + os.sep)
            parts = _encode("\0".join(names)).split(b"\0")
            start = len(blob)
            blob += prefix + prefix.join(parts)
            step = len(prefix)
            # ends[k] = start + (k + 1) x len(prefix) + the lengths of parts[0..k]: C-level iterators only
            ends.extend(map(operator.add, itertools.accumulate(map(len, parts)),
                            range(start + step, start + step * (len(parts) + 1), step)))
            labels.extend(array("i", [label]) * len(parts))
        return cls._from_buffers(root, tuple(classes), bytes(blob), ends, labels)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"FolderIndex is immutable (tried to set {name!r})")

    @classmethod
    def _from_buffers(cls, root: str, classes: tuple[str, ...], paths: bytes, ends: array, labels: array
                      ) -> "FolderIndex":
        index = cls.__new__(cls)
        index._set(root, classes, paths, ends, labels)
        return index

    def __reduce__(self) -> tuple[Any, ...]:
        return (FolderIndex._from_buffers, (self.root, self.classes, self._paths, self._ends, self._labels))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FolderIndex):
            return NotImplemented
        return (self.root, self.classes, self._paths, self._ends, self._labels) == (
            other.root, other.classes, other._paths, other._ends, other._labels)

    def __hash__(self) -> int:
        return hash((self.root, self.classes, self._paths))

    def __repr__(self) -> str:
        return f"FolderIndex({self.root!r}, {len(self.classes)} classes, {len(self)} samples)"

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self._ends)

    def rel(self, i: int) -> str:
        """Sample ``i``'s path relative to ``root``."""
        begin = self._ends[i - 1] if i > 0 else 0
        return _decode(self._paths[begin: self._ends[i]])

    def label(self, i: int) -> int:
        return self._labels[i]

    @property
    def labels(self) -> Sequence[int]:
        """Every sample's label, in order (a flat array: no per-entry objects)."""
        return self._labels

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.rel(i))

    # the sample-source contract (.sources.SampleSource): what a dataset, the decoded cache and
    # check use, so that none of them learns where the bytes come from

    def name(self, i: int) -> str:
        """What a message calls sample ``i``: its file's path."""
        return self.path(i)

    def read(self, i: int) -> bytes:
        """Sample ``i``'s encoded bytes; ImageError naming the file when it cannot be read."""
        return read_regular_file(self.path(i))

    def change_marks(self, lo: int, hi: int) -> list[str]:
        """A line per sample ``lo .. hi - 1`` (relative path, label, size, mtime) that changes when
        its file may have: one ``stat`` each. DataError naming a file that is gone."""
        lines = []
        for rel, label in self.samples[lo:hi]:
            path = os.path.join(self.root, rel)
            try:
                st = os.stat(path)
            except OSError as exc:
                raise DataError(f"image {path!r} cannot be read ({exc.strerror}); it was there when the "
                                f"folders were scanned: restore it, or start again") from None
            lines.append(f"{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n")
        return lines

    @property
    def samples(self) -> "Samples":
        """``(relative path, label)`` pairs as a read-only sequence, made on access."""
        return Samples(self)

    def fingerprint(self) -> dict[str, Any]:
        """The count and a hash of the (path, label) list: what a mid-epoch resume must see again."""
        h = hashlib.sha256()
        h.update("\n".join(f"{rel}\t{label}" for rel, label in self.samples).encode("utf-8", "surrogateescape"))
        return {"count": len(self), "sha256": h.hexdigest()}

    def subset(self, keep: Sequence[int]) -> "FolderIndex":
        return FolderIndex(self.root, self.classes, ((self.rel(i), self._labels[i]) for i in keep))

    def without(self, bad_paths: set[str]) -> "FolderIndex":
        return FolderIndex(self.root, self.classes, (s for s in self.samples if s[0] not in bad_paths))


class Samples(Sequence[tuple[str, int]]):
    """A FolderIndex's ``(relative path, label)`` pairs, each made when read."""

    __slots__ = ("_index",)

    def __init__(self, index: FolderIndex) -> None:
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    @overload
    def __getitem__(self, i: int) -> tuple[str, int]: ...

    @overload
    def __getitem__(self, i: slice) -> list[tuple[str, int]]: ...

    def __getitem__(self, i: int | slice) -> tuple[str, int] | list[tuple[str, int]]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self._index)
        if not -n <= i < n:
            raise IndexError(f"sample {i} of {n}")
        i %= n
        return self._index.rel(i), self._index.label(i)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        index = self._index
        paths, ends, labels = index._paths, index._ends, index._labels
        begin = 0
        for end, label in zip(ends, labels):
            yield _decode(paths[begin:end]), label
            begin = end


def _visible(name: str) -> bool:
    return not name.startswith(".") and not name.startswith("__")


def _class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and _visible(e.name))


def _images_under(class_dir: Path, ticker: Ticker, seen: set[tuple[int, int]],
                  walked: list[tuple[str, int]] | None = None) -> list[str]:
    """Image files below ``class_dir`` (recursively, following symlinks), as sorted paths relative to
    it. A directory reached again within the class (a symlink loop such as ``ln -s . loop``, or a
    second link to it) is walked once only: ``seen`` holds the (device, inode) of every directory
    walked in this class folder. ``walked`` receives each directory listed, relative to the class
    folder's parent, with its mtime (what :mod:`.tree_memory` checks next time)."""
    found = []
    parent = class_dir.parent
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            log.warning("data: skipped '%s': it is a directory already scanned (a symlink loop or a second "
                        "link to it)", dirpath)
            continue
        seen.add((st.st_dev, st.st_ino))
        if walked is not None:
            walked.append((os.path.relpath(dirpath, parent), st.st_mtime_ns))
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        images = filter(_IMAGE_NAME.match, filenames)  # the per-file test in C: 1.28M names in a blink
        if dirpath == str(class_dir):
            found.extend(images)
        else:
            prefix = os.path.relpath(dirpath, class_dir) + os.sep
            found.extend(prefix + name for name in images)
        ticker.tick(len(filenames))
    found.sort()
    return found


def scan(folder: str | Path, classes: Sequence[str] | None = None, memory_dir: Path | None = None) -> FolderIndex:
    """Index ``folder``; class order from ``classes`` when given, else sorted folder names.
    ``memory_dir``: remember the listings there and reuse those of unchanged class folders
    (:mod:`.tree_memory`).

    Raises DataError naming the folder for: a missing folder, a class in ``classes`` without a folder,
    a folder not in ``classes``, a class folder without images, or no class folders at all.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder '{folder}' not found; set data.root to the folder that holds "
                        f"train/ and val/ (or data.train_dir=. for a folder of class folders)")
    memory = TreeMemory(memory_dir, folder, FolderIndex._from_buffers) if memory_dir is not None else None
    found = memory.class_folders(folder, _class_folders) if memory is not None else _class_folders(folder)
    if not found:
        raise DataError(f"data folder '{folder}' has no class folders; put each class's images in "
                        f"'{folder}/<class name>/'")
    if classes is None:
        names = found
    else:
        names = list(classes)
        missing = [c for c in names if c not in found]
        if missing:
            raise DataError(f"data.classes names {missing[0]!r} but '{folder / missing[0]}' does not "
                            f"exist; create it or remove {missing[0]!r} from data.classes")
        extra = [c for c in found if c not in names]
        if extra:
            raise DataError(f"folder '{folder / extra[0]}' is not in data.classes {names}; add "
                            f"{extra[0]!r} to data.classes or move the folder out of '{folder}'")
    ticker = Ticker(f"data: scanning {folder}", unit="files")
    unchanged = {name for name in names if memory.unchanged(name, folder)} if memory is not None else set()
    index = memory.whole(names) if memory is not None and len(unchanged) == len(names) else None
    if index is None:
        per_class: list[list[str]] = []
        for name in names:
            if memory is not None and name in unchanged:
                files = memory.files(name)
                memory.reuse(name)
                ticker.tick(len(files))
            else:
                walked: list[tuple[str, int]] = []
                files = _images_under(folder / name, ticker, set(), walked)
                if memory is not None:
                    memory.listed_again(name, walked)
            if not files:
                raise DataError(f"class folder '{folder / name}' holds no images "
                                f"({', '.join(IMAGE_EXTENSIONS[:3])}, ...); add images or remove the folder")
            per_class.append(files)
        index = FolderIndex.from_classes(str(folder.resolve()), names, per_class)
    if memory is not None:
        memory.save(index)
        if memory.reused:
            log.info("data.index_cache: %s: %d class folder(s) unchanged since the last scan, %d listed again",
                     folder, memory.reused, memory.listed)
    return index


def check_same_classes(train: FolderIndex, val: FolderIndex, val_folder: str) -> None:
    """Train and val must name the same classes in the same order."""
    if train.classes == val.classes:
        return
    missing = [c for c in train.classes if c not in val.classes]
    extra = [c for c in val.classes if c not in train.classes]
    parts = []
    if missing:
        parts.append(f"missing in val: {missing}")
    if extra:
        parts.append(f"only in val: {extra}")
    raise DataError(f"val folder '{val_folder}' has other classes than train ({'; '.join(parts)}); "
                    f"give both splits the same class folders")


def split_holdout(index: FolderIndex, fraction: float) -> tuple[FolderIndex, FolderIndex]:
    """Deterministic, evenly spread per-class split of ``index`` into (train, val).

    Within each class (in sorted file order) sample ``i`` goes to val when ``floor((i+1)*f)``
    exceeds ``floor(i*f)``: the same files every time, on every node, with no random numbers.
    """
    train_keep, val_keep = [], []
    position: dict[int, int] = {}
    for i, label in enumerate(index.labels):
        k = position.get(label, 0)
        position[label] = k + 1
        if int((k + 1) * fraction) > int(k * fraction):
            val_keep.append(i)
        else:
            train_keep.append(i)
    return index.subset(train_keep), index.subset(val_keep)
