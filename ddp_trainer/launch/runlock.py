"""One run per ``output_dir``: global rank 0 holds an exclusive OS lock on ``<output_dir>/.lock``
for the whole run. The kernel releases it when the process ends, however it ends (a killed run never
leaves a stale lock); the file says who holds it, so a refused second run can name the holder."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import UserError

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise a UserError naming the run that holds it. Creates ``output_dir``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise UserError(f"output_dir '{self.path.parent}' is in use by another run ({holder}); wait for it to "
                            f"end, stop it, or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
