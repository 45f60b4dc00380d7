"""A checkpoint file as the filesystem gives it: which of the errors met while reading it are the
filesystem's (permissions, EIO, ESTALE: the file may be whole) and which are its content's.

torch raises both kinds as they come, and a damaged file can raise an OSError too (a cut zip archive:
EINVAL from a seek before the file's start, computed from its damaged records), so the kind of an
error is told where it happened, on the file's own opens, reads and seeks, never by its type.
"""
from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import BinaryIO

from ..errors import CheckpointUnreadable, show_path


def unreadable(path: Path, exc: OSError, what: str = "checkpoint") -> CheckpointUnreadable:
    """The error for a file or folder the filesystem would not give: its name and the OS error."""
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    why = f"{type(exc).__name__}{' ' + code if code else ''}: {exc.strerror or exc}"
    return CheckpointUnreadable(
        f"{what} '{show_path(path)}' cannot be read ({why}); this is an error of the filesystem, not a damaged "
        f"file, so nothing was skipped or changed: fix the cause (permissions, the mount, the disk) and run again")


class CheckpointFile:
    """One file, opened as often as its readers need; ``fs_error`` keeps the first OSError the
    operating system raised on an open, a read or a seek (a seek's EINVAL excepted: a position the
    content asked for, before the file's start)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fs_error: OSError | None = None

    def open(self) -> BinaryIO:
        """A buffered reader of the file (the file object ``open(path, "rb")`` would give)."""
        try:
            raw = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed with the reader
        except OSError as exc:
            self._keep(exc)
            raise
        return io.BufferedReader(_Watched(raw, self))

    def fail(self, exc: BaseException) -> BaseException:
        """What a failed read of the file raises: CheckpointUnreadable when the filesystem failed
        (whatever the reader made of it), else ``exc``."""
        return unreadable(self.path, self.fs_error) if self.fs_error is not None else exc

    def _keep(self, exc: OSError) -> None:
        if self.fs_error is None:
            self.fs_error = exc


class _Watched(io.RawIOBase):
    """A raw file that reports its OS errors to its :class:`CheckpointFile`."""

    def __init__(self, raw: io.RawIOBase, owner: CheckpointFile) -> None:
        super().__init__()
        self._raw, self._owner = raw, owner
        self.name = os.fspath(owner.path)  # torch names the file in some errors

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int | None:  # noqa: ANN001 - a writable buffer
        try:
            return self._raw.readinto(b)
        except OSError as exc:
            self._owner._keep(exc)
            raise

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        try:
            return self._raw.seek(pos, whence)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                self._owner._keep(exc)
            raise

    def tell(self) -> int:
        return self._raw.tell()

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        self._raw.close()
        super().close()
