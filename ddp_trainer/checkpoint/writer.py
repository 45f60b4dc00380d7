"""Crash-safe checkpoint writes from global rank 0: one ``torch.save`` through a temporary file
beside the target, fsynced and renamed into place (a kill at any instant leaves the previous file
intact), more names for the same bytes as hard links, retention of the epoch files, and a
background writer that holds only a CPU copy of the state.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import CheckpointError
from ..fsutil import atomic_write, human_bytes, publish, temp_path
from .format import with_checksum

log = logging.getLogger("ddp_trainer")

EPOCH_FILE = re.compile(r"^epoch_(\d{4,})\.pt$")
BEST_EPOCH_FILE = re.compile(r"^best_epoch_(\d{4,})\.pt$")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`~ddp_trainer.fsutil.atomic_write`."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def state_nbytes(obj: Any) -> int:
    """About what ``torch.save(obj)`` writes: the bytes of every tensor in it."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def write_failure(target: Path, exc: BaseException, needed: int) -> str:
    """One line for a failed checkpoint write. torch.save reports a full disk as
    ``[enforce fail at inline_container.cc] unexpected pos``; name the device's lack of space instead."""
    folder = target.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = -1
    errno_ = getattr(exc, "errno", None)
    if errno_ == errno.ENOSPC or "unexpected pos" in str(exc) or 0 <= free < needed:
        where = f"{human_bytes(free)} free there" if free >= 0 else "free space unknown"
        return (f"no space left on the device holding '{folder}' to write {target.name} (needed about "
                f"{human_bytes(needed)}, {where}); the previous checkpoints are intact: free space or choose "
                f"another output_dir, then resume")
    why = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[-1][:200]
    return (f"checkpoint write to '{target}' failed ({type(exc).__name__}: {why}); the previous checkpoints in "
            f"'{folder}' are intact; fix the cause (permissions, the filesystem), then resume")


def atomic_link(src: Path, dst: Path) -> None:
    """Make ``dst`` name the same bytes as ``src`` (hard link, else copy), atomically."""
    tmp = temp_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    publish(tmp, dst)


class CheckpointWriter:
    """Writes ``last.pt``, ``best.pt`` and ``epoch_NNNN.pt`` in one folder. Built on global rank 0 only.

    Synchronous; :class:`AsyncCheckpointWriter` runs it in the background.
    """

    def __init__(self, folder: Path, keep_last: int) -> None:
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp-*"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
        if keep_last == 0:
            kept = sorted(p.name for p in self.folder.iterdir() if EPOCH_FILE.match(p.name))
            if kept:
                log.info("checkpoint.keep_last=0: this run writes no epoch files and removes none; the %d there "
                         "from before are kept (%s)", len(kept), _names(kept))

    def save(self, state: Mapping[str, Any], *, epoch_file: int | None = None, best: bool = False,
             also: Sequence[str] = (), remove: Sequence[str] = ()) -> Path:
        """Write ``state`` once and name it last.pt (+ epoch_NNNN.pt, + best.pt, + the names in ``also``).

        Older epoch files, and the names in ``remove``, are removed only after the new files are in place.
        """
        first = self.folder / (f"epoch_{epoch_file:04d}.pt" if epoch_file is not None and self.keep_last > 0
                               else "last.pt")
        state = with_checksum(on_cpu(state))  # the same file whichever writer: CPU tensors only
        try:
            atomic_save(state, first)
            if first.name != "last.pt":
                atomic_link(first, self.folder / "last.pt")
            if best:
                atomic_link(first, self.folder / "best.pt")
            for name in also:
                atomic_link(first, self.folder / name)
        except Exception as exc:  # noqa: BLE001 - every write failure becomes one message naming the file
            raise CheckpointError(write_failure(first, exc, state_nbytes(state))) from None
        for name in remove:
            (self.folder / name).unlink(missing_ok=True)
        if first.name != "last.pt":  # an epoch file was written: the oldest beyond keep_last go
            self._prune()
        return first

    def check(self) -> None:
        """Nothing to report: a synchronous save raises where it fails."""

    def wait(self) -> None:
        """Nothing in flight."""

    def close(self) -> None:
        """Nothing in flight."""

    def _prune(self) -> None:
        """Remove the oldest epoch files beyond ``keep_last`` (logged), once a newer one is in place.
        Never with keep_last=0: a run that writes no epoch file has none to replace them with."""
        epochs = sorted(p for p in self.folder.iterdir() if EPOCH_FILE.match(p.name))
        gone = epochs[: max(0, len(epochs) - self.keep_last)]
        for old in gone:
            old.unlink(missing_ok=True)
        if gone:
            log.info("checkpoint: removed %s (checkpoint.keep_last=%d)", _names([p.name for p in gone]), self.keep_last)


def _names(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 4 else f"{names[0]} ... {names[-1]}"


def on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor on the CPU (device tensors copied; CPU tensors as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def cpu_snapshot(obj: Any, staging: list[torch.Tensor] | None = None) -> tuple[Any, torch.cuda.Event | None]:
    """A deep copy of ``obj`` with every tensor copied to the CPU (what a background write may hold
    while training goes on changing the live tensors), and an event that marks when the copies from
    the GPU have landed (None when there were none): the writer waits on it, the training thread
    does not (the copies were queued on the training stream, before anything that changes the tensors).

    ``staging``: CPU buffers kept from the previous snapshot, reused in order when shape and dtype
    match (a ``copy_`` into warm memory instead of a fresh allocation: most of the cost of a snapshot).
    The list is updated to this snapshot's buffers. Only safe when the previous write has finished.
    """
    reuse = iter(list(staging or []))
    fresh: list[torch.Tensor] = []

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            src = value.detach()
            buf = next(reuse, None)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = torch.empty(src.shape, dtype=src.dtype, device="cpu",
                                  pin_memory=src.device.type == "cuda")
            buf.copy_(src, non_blocking=src.device.type == "cuda")
            fresh.append(buf)
            return buf
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    out = copy(obj)
    ready = None
    if any(t.is_pinned() for t in fresh):  # non-blocking copies from a GPU are in flight
        ready = torch.cuda.Event()
        ready.record()
    if staging is not None:
        staging[:] = fresh
    return out, ready


class AsyncCheckpointWriter:
    """:class:`CheckpointWriter` in a background thread: the caller is blocked only for the CPU copy.

    At most one save is in flight (a new save first waits for the previous one). A failed background
    write is raised as CheckpointError, naming the path, at the next :meth:`check`, :meth:`save` or
    :meth:`close`; the atomic rename means the previous files are intact.
    """

    def __init__(self, folder: Path, keep_last: int) -> None:
        self.sync = CheckpointWriter(folder, keep_last)
        self.folder = self.sync.folder
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._staging: list[torch.Tensor] = []  # CPU buffers reused by every snapshot

    def _run(self, state: dict[str, Any], ready: torch.cuda.Event | None, kwargs: dict[str, Any]) -> None:
        try:
            if ready is not None:
                ready.synchronize()  # the copies from the GPU have landed
            path = self.sync.save(state, **kwargs)
            log.info("checkpoint: %s written", path.name)
        except CheckpointError as exc:  # reported on the training thread, at the next step
            self._error = exc.message
        except BaseException as exc:  # noqa: BLE001 - reported on the training thread, at the next step
            self._error = f"checkpoint write in '{self.folder}' failed ({type(exc).__name__}: {exc})"

    @property
    def failed(self) -> bool:
        """A finished background write failed (no waiting, no collective)."""
        return self._error is not None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def check(self) -> None:
        """Raise the error of a finished background write, if any (does not wait)."""
        if self._error is not None:
            raise CheckpointError(self._error)

    def save(self, state: Mapping[str, Any], *, epoch_file: int | None = None, best: bool = False,
             also: Sequence[str] = (), remove: Sequence[str] = ()) -> Path:
        self.wait()
        self.check()
        snapshot, ready = cpu_snapshot(dict(state), self._staging)
        kwargs = {"epoch_file": epoch_file, "best": best, "also": tuple(also), "remove": tuple(remove)}
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=False,
                                        args=(snapshot, ready, kwargs))
        self._thread.start()
        return self.folder / ("last.pt" if epoch_file is None or self.sync.keep_last == 0 else f"epoch_{epoch_file:04d}.pt")

    def close(self) -> None:
        """Wait for the last save; raise if it failed."""
        self.wait()
        self.check()


