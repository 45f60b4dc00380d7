"""Finding the checkpoints to resume from: the files of a checkpoint folder, one group per file (a file
and its hard links), and the state each holds, read from its pickle alone (no tensor is read).

A folder or file the filesystem refuses raises CheckpointUnreadable: it is never taken for an empty
folder or a damaged file, since resuming an older file would prune and overwrite the newer one.
"""
from __future__ import annotations

import os
import pickle
import stat
import zipfile
from pathlib import Path
from typing import Any, Mapping

from ..errors import CheckpointError, CheckpointUnreadable, show_path
from .format import resume_key
from .source import CheckpointFile, unreadable
from .writer import BEST_EPOCH_FILE, EPOCH_FILE


def resume_candidates(folder: Path) -> list[Path]:
    """Every checkpoint file name of ``folder`` (last.pt, epoch_NNNN.pt by number, best_epoch_NNNN.pt,
    best.pt): a folder whose newer files were pruned or deleted still resumes, never starts over.
    Which is tried first is the resume's, by the state the files hold (:func:`peek_state`), not by
    name. A folder that does not exist has none; one that cannot be listed raises CheckpointUnreadable
    (an unlistable folder is not an empty one: starting over there would overwrite its run)."""
    folder = Path(folder)
    try:
        names = [entry.name for entry in os.scandir(folder)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise unreadable(folder, exc, "checkpoint folder") from None
    epochs = sorted((n for n in names if EPOCH_FILE.match(n)), reverse=True)
    bests = sorted((n for n in names if BEST_EPOCH_FILE.match(n)), reverse=True)
    first = [n for n in ("last.pt",) if n in names]
    last = [n for n in ("best.pt",) if n in names]
    return [folder / n for n in first + epochs + bests + last]


def has_checkpoints(folder: Path) -> bool:
    return bool(resume_candidates(folder))


def require_file(path: Path) -> os.stat_result:
    """``path``'s stat when it is a regular file. Absent: CheckpointError "not found"; a folder, a FIFO
    or a device, or a stat that fails: CheckpointUnreadable (opening a FIFO would block for good)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{show_path(path)}' not found; check the path "
                              f"(resume=PATH, --checkpoint)") from None
    except OSError as exc:
        raise unreadable(path, exc) from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointUnreadable(f"checkpoint '{show_path(path)}' is a folder, not a checkpoint file; "
                                   f"{folder_hint(path)}")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        raise CheckpointUnreadable(f"checkpoint '{show_path(path)}' is {kind}, not a regular file; give the path "
                                   f"of a checkpoint file")
    return st


def folder_hint(folder: Path) -> str:
    """What to give instead of a folder: one of its checkpoints (or of its checkpoints/: an output_dir)."""
    for where in (folder, folder / "checkpoints"):
        try:
            found = resume_candidates(where)
        except CheckpointUnreadable:
            found = []
        if found:
            names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
            return (f"give one of its files, e.g. '{show_path(found[0])}' ('{show_path(where)}' holds {names}); "
                    f"to continue a run in its own output_dir, use resume=auto")
    return "give the path of a checkpoint file (a run's are in OUTPUT_DIR/checkpoints/)"


def same_file_groups(paths: list[Path]) -> list[list[Path]]:
    """``paths`` grouped by the file they name (last.pt, epoch_NNNN.pt and best.pt are often one file,
    hard-linked), in ``paths``' order; a name removed since the folder was listed is left out.
    CheckpointUnreadable for a name the filesystem refuses or that is no regular file."""
    groups: dict[tuple[int, int], list[Path]] = {}
    for path in paths:
        try:
            st = require_file(path)
        except CheckpointUnreadable:
            raise
        except CheckpointError:  # removed since the folder was listed
            continue
        groups.setdefault((st.st_dev, st.st_ino), []).append(path)
    return list(groups.values())


def peek_state(path: Path) -> tuple[int, int, int] | None:
    """:func:`~.format.resume_key` of the file, read from the pickle of its zip archive alone: no tensor
    is read and no object the pickle names is built (each is a stand-in). None when that cannot be told
    (damaged content, the legacy format, another trainer's keys): the full read tells. CheckpointUnreadable
    when the filesystem refuses."""
    source = CheckpointFile(path)
    try:
        with source.open() as f, zipfile.ZipFile(f) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return None
            with z.open(name) as pkl:
                obj = _StateOnly(pkl).load()
    except Exception as exc:  # noqa: BLE001 - the content's errors mean "unknown"; the filesystem's stop
        if source.fs_error is not None:
            raise source.fail(exc) from None
        return None
    return resume_key(obj) if isinstance(obj, Mapping) else None


class _StandIn:
    """Whatever a pickle names (a tensor, its storage, an OrderedDict, a class): never built, never code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_StandIn":
        return _StandIn()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StateOnly(pickle.Unpickler):
    """Unpickles the plain values (dicts, lists, numbers, strings) and stands in for everything else."""

    def find_class(self, module: str, name: str) -> Any:
        return _StandIn

    def persistent_load(self, pid: Any) -> Any:
        return None
