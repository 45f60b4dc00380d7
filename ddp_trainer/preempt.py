"""Graceful stops on the signals a cluster sends before it kills a job (SIGUSR1 by ``--signal``,
SIGTERM at the time limit or on preemption, SIGINT from Ctrl-C).

The handler only records the signal. At step boundaries the ranks agree (one tiny all-reduce on a
CPU group, every ``preempt.check_every_steps`` steps) that a stop was asked, save one checkpoint
together, write ``<output_dir>/PREEMPTED`` (rank 0) and exit with :data:`EXIT_PREEMPTED`. Loader
workers ignore these signals, so they cannot die of them before the checkpoint is written.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .fsutil import atomic_write_text

EXIT_PREEMPTED = 3  # stopped by a signal after saving a checkpoint: run the same command to resume
MARKER = "PREEMPTED"
MARKER_ENV = "DDP_TRAINER_PREEMPT_MARKER"  # an extra marker path (set by the sbatch scripts)


class Preempted(Exception):
    """Raised on every rank after the stop checkpoint was saved."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, signal_name: str, where: str) -> None:
        super().__init__(f"stopped by {signal_name} after saving a checkpoint ({where}); "
                         f"run the same command to resume")
        self.signal_name = signal_name


def parse_signals(names: Sequence[str]) -> list[signal.Signals]:
    out = []
    for name in names:
        key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        out.append(signal.Signals[key])
    return out


class StopRequest:
    """Records the first of ``signals`` this process receives; nothing else happens in the handler."""

    def __init__(self, signals: Sequence[signal.Signals]) -> None:
        self.signals = list(signals)
        self.received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> "StopRequest":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    @property
    def signum(self) -> int:
        """The received signal's number, 0 when none (what the ranks agree on)."""
        return int(signal.Signals[self.received]) if self.received else 0

    def restore(self) -> None:
        for s, old in self._previous.items():
            signal.signal(s, old)
        self._previous.clear()


def worker_init_ignoring(signals: Sequence[signal.Signals]) -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn``: loader workers ignore the stop signals (the main process
    shuts them down itself), so a signal sent to every process of a job cannot kill them first."""
    names = [s.name for s in signals]

    def init(worker_id: int) -> None:
        for name in names:
            signal.signal(signal.Signals[name], signal.SIG_IGN)

    return init


def write_marker(output_dir: Path | None, signal_name: str, epoch: int, step: int) -> None:
    """Say that the run stopped at a checkpoint: ``<output_dir>/PREEMPTED`` (when ``output_dir`` is
    given: global rank 0) and ``$DDP_TRAINER_PREEMPT_MARKER`` (when set: each node's local rank 0, so
    that the batch shell finds it on its own node without a shared filesystem)."""
    text = json.dumps({"signal": signal_name, "epoch": epoch, "step": step, "time": time.time(),
                       "slurm_job_id": os.environ.get("SLURM_JOB_ID")}) + "\n"
    if output_dir is not None:
        atomic_write_text(Path(output_dir) / MARKER, text)
    extra = os.environ.get(MARKER_ENV)
    if extra:
        Path(extra).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(extra), text)


def clear_marker(output_dir: Path) -> None:
    (Path(output_dir) / MARKER).unlink(missing_ok=True)
