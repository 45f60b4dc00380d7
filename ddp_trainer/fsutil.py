"""Crash-safe file writes: a temporary file beside the target, fsynced, renamed into place, and the
folder fsynced, so that a kill or power loss at any instant leaves either the old file or the new one.

Temporary files are named ``.<name>.tmp-<pid>``; a writer of a folder may remove those left by a
killed process (see ``CheckpointWriter``).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (best effort: some filesystems refuse a folder fsync)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The temporary name a write of ``path`` goes through."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def publish(tmp: Path, path: Path) -> None:
    """Rename a complete, fsynced ``tmp`` onto ``path`` and make the rename durable."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit fsync it and :func:`publish` it as ``path``.
    On an exception the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def human_bytes(n: int) -> str:
    """``n`` bytes as B / KB / MB / GB / TB (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError


def check_writable(folder: Path) -> None:
    """Raise the OSError a new file in ``folder`` would meet (a read-only mount, permissions, a full
    inode table): creates, writes and removes one temporary file. Run at start-up, so that a folder a
    run cannot write stops it before its first epoch, not at the first checkpoint."""
    probe = Path(folder) / f".write-probe.tmp-{os.getpid()}"  # a temp name: writers clear leftovers
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
