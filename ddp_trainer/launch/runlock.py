"""One run per ``output_dir``: global rank 0 holds an exclusive lock on the folder itself for the whole
run. The kernel releases it when the process ends, however it ends (a killed run never leaves a
stale lock), and a stray ``rm`` of a file inside cannot take it away. ``<output_dir>/.lock`` only
says who holds it, so that a refused second run can name the holder.

A child forked from the holder (a DataLoader worker, a cache-building worker) would hold the lock
too, since it shares the open folder: such a child outlives a killed run for seconds, until it
notices its parent is gone, and the next run would be refused meanwhile. Every child closes its
copy right after the fork (``os.register_at_fork``).

Filesystems that refuse a lock on a folder (NFS emulates flock with write locks, and a folder
cannot be opened for writing) fall back to locking ``.lock`` itself.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import UserError
from ..fsutil import atomic_write_text

LOCK_NAME = ".lock"
_HELD: set[int] = set()  # lock descriptors of this process: closed in every forked child


def _close_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    def __init__(self, output_dir: Path) -> None:
        self.folder = Path(output_dir)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise a UserError naming the run that holds it. Creates ``output_dir``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        holder = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            on_folder = True
        except BlockingIOError:
            os.close(fd)
            raise self._busy() from None
        except OSError:  # a filesystem without folder locks: lock the holder file instead
            os.close(fd)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy() from None
            on_folder = False
        self.fd = fd
        _HELD.add(fd)
        if on_folder:
            atomic_write_text(self.path, holder)
        else:  # the locked file itself: written in place (a replacement would be a new, unlocked file)
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.encode(), 0)
        return self

    def _busy(self) -> UserError:
        return UserError(f"output_dir '{self.folder}' is in use by another run ({self._holder()}); wait for it to "
                         f"end, stop it, or choose another output_dir")

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
        except FileNotFoundError:
            return f"holder unknown: its {LOCK_NAME} file, which names it, was removed"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)
            self.fd = None
