"""What the user sees while training: a tqdm bar on global rank 0 when stderr is a terminal, plain
periodic log lines otherwise (SLURM logs, CI, pipes), and optional TensorBoard scalars."""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

from .errors import ConfigError
from .extras import optional

log = logging.getLogger("ddp_trainer")


def use_progress_bar(is_main: bool, stream: TextIO | None = None) -> bool:
    """A bar only on global rank 0 and only when ``stream`` (stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return is_main and stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """One epoch's progress: a tqdm bar, or nothing (the trainer logs lines at intervals instead)."""

    def __init__(self, enabled: bool, total: int, desc: str, initial: int = 0) -> None:
        self.bar = None
        if enabled:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="img", unit_scale=True,
                            dynamic_ncols=True, leave=True, file=sys.stderr)

    @property
    def active(self) -> bool:
        return self.bar is not None

    def update(self, images: int, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(images)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Scalars:
    """TensorBoard scalars (``log.tensorboard: true``) on global rank 0; a no-op otherwise. Like every
    tracker, TensorBoard missing (or its writer failing to start or write) is one warning line and
    the run goes on without it."""

    def __init__(self, enabled: bool, folder: str) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            # torch's module imports the tensorboard package: the extra
            board = optional("torch.utils.tensorboard", "log.tensorboard=true", "tensorboard", package="tensorboard",
                             instead="log.tensorboard=false")
            self.writer = board.SummaryWriter(folder)
        except ConfigError as exc:
            log.warning("%s; the run goes on without it", exc)
        except Exception as exc:  # noqa: BLE001 - a tracker that cannot start never fails the run
            log.warning("log.tensorboard: cannot start (%s: %s); the run goes on without it", type(exc).__name__, exc)

    def add(self, row: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        try:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        except Exception as exc:  # noqa: BLE001 - a tracker never fails the run
            log.warning("log.tensorboard: cannot write (%s: %s); the run goes on without it", type(exc).__name__, exc)
            self.close()

    def close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception as exc:  # noqa: BLE001 - closing a tracker never fails the run
                log.warning("log.tensorboard: cannot close (%s: %s)", type(exc).__name__, exc)


PREPARATION_PROGRESS_S = 10.0  # seconds between progress lines of a long preparation step


class Ticker:
    """Progress of a long preparation step (scan, verification, cache build) as a log line at most
    every ``every_s`` seconds: ``what: done/total items, rate, time left``. Cheap to call per item.
    Logs at INFO, which only global rank 0 shows."""

    def __init__(self, what: str, total: int | None = None, unit: str = "images", every_s: float | None = None,
                 scale: int = 1) -> None:
        self._clock = time.monotonic
        self.what, self.total, self.unit = what, total, unit
        self.every_s = PREPARATION_PROGRESS_S if every_s is None else every_s
        self.scale = scale  # this process does 1/scale of the work (a share of the ranks)
        self.done = 0
        self.t0 = self._clock()
        self._next = self.t0 + self.every_s

    def tick(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if now >= self._next:
            self._next = now + self.every_s
            self._log(now)

    def _log(self, now: float) -> None:
        done = self.done * self.scale
        rate = done / max(now - self.t0, 1e-9)
        if self.total:
            left = (self.total - done) / max(rate, 1e-9)
            log.info("%s: %d/%d %s (%.0f%%), %.0f %s/s, about %s left", self.what, done, self.total, self.unit,
                     100 * done / self.total, rate, self.unit, _duration(left))
        else:
            log.info("%s: %d %s so far, %.0f %s/s", self.what, done, self.unit, rate, self.unit)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
