"""Errors a user can fix, and how they reach the terminal.

A :class:`UserError` is printed as one line naming the cause and the fix, with exit code 2 and no
traceback. Errors that rank 0 detected and broadcast carry ``shared=True`` so that only rank 0
prints them, while every rank still exits with the same code.
"""
from __future__ import annotations

import os

EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected error (a bug, a crashed peer, ...)
EXIT_USER_ERROR = 2  # bad config, bad data, refused checkpoint: the message says what to fix


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint) that the message explains."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, *, shared: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.shared = shared


class ConfigError(UserError):
    """A bad config key or value."""


class DataError(UserError):
    """A missing, inconsistent or unreadable dataset."""


class ImageError(DataError):
    """An image file that cannot be read or decoded. ``message`` adds training's way round it
    (``data.bad_images=skip``); ``plain`` is the same line without it, for the commands that take no
    training config (predict)."""

    TRAINING_FIX = "or set data.bad_images=skip"

    def __init__(self, message: str, *, shared: bool = False) -> None:
        super().__init__(message, shared=shared)
        self.plain = message.removesuffix(", " + self.TRAINING_FIX).removesuffix("; " + self.TRAINING_FIX)


class CheckpointError(UserError):
    """A missing, corrupt, refused or mismatching checkpoint."""


class CheckpointUnreadable(CheckpointError):
    """A checkpoint the filesystem would not give now (permissions, EIO, ESTALE, a folder or a FIFO
    where the file should be). Not damaged content: ``resume=auto`` never skips it for an older file."""


class ExportError(UserError):
    """A model that cannot be exported, or an export its check refused; the message has the figures."""


class PeerTimeout(UserError):
    """A rank waited past the preparation timeout for another rank's step; the message names it."""

    exit_code = EXIT_FAILURE


class PeerLost(UserError):
    """A collective failed before its timeout: a peer's process or host died, or the network broke."""

    exit_code = EXIT_FAILURE


class CollectiveFailed(RuntimeError):
    """A collective with the other ranks failed. Raised where the collective was issued, which is
    the only place that knows what it was and how long it waited: torch reports a peer that never
    answered and a peer that died as the same plain RuntimeError, so the two are told apart by the
    wait (``timed_out``: it lasted about the timeout in force), never by the error's text."""

    TIMEOUT_FRACTION = 0.9  # a wait this close to the timeout in force ended because of it

    def __init__(self, what: str, waited_s: float, timeout_s: float, cause: BaseException) -> None:
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        super().__init__(f"{what} failed after {waited_s:.1f} s: {first[:300]}")
        self.what, self.waited_s, self.timeout_s = what, waited_s, timeout_s
        self.detail = first[:300]

    @property
    def timed_out(self) -> bool:
        return self.waited_s >= self.TIMEOUT_FRACTION * self.timeout_s


class NonFiniteLoss(UserError):
    """The training loss became nan/inf (train.stop_on_nonfinite); the message names the step."""

    exit_code = EXIT_FAILURE


def one_line(exc: BaseException) -> str:
    """The user-facing one-line text of ``exc``.

    Errors raised inside DataLoader workers come back wrapped with the worker's traceback in their
    message; the last line of that text is the original ``Class: message`` line.
    """
    text = getattr(exc, "message", None) or str(exc)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and "Traceback" in text:
        last = lines[-1].strip()
        head, sep, rest = last.partition(": ")
        if sep and "." in head and " " not in head:  # "pkg.mod.DataError: ..."
            return rest
        return last
    return " ".join(line.strip() for line in lines) if len(lines) <= 3 else lines[0].strip()


def show_path(path: "str | bytes | os.PathLike[str]") -> str:
    """``path`` for a message or a log line. A file name that is not valid UTF-8 (kept by Python as
    surrogate escapes, which cannot be printed or logged) is shown with its raw bytes as ``\\xNN``."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
