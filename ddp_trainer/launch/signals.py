"""Stops on the signals a cluster or a user sends: SIGUSR1 (SLURM's ``--signal`` warning), SIGTERM
(time limit, preemption, ``scancel``), SIGINT (Ctrl-C).

While training runs, the first signal is only recorded. At step boundaries the ranks agree (one
tiny all-reduce on a CPU group, every ``preempt.check_every_steps`` steps) that a stop was asked, save
one checkpoint together, write ``<output_dir>/PREEMPTED`` (rank 0) and stop. Loader workers ignore
these signals, so they cannot die of them before the checkpoint is written.

Before the training loop starts there is nothing new to save: SIGTERM and SIGINT end the process at
once, naming what it was doing (waiting for peers, scanning, building the cache); SIGUSR1, a warning
that asks for a stop *and requeue*, is kept and the ranks stop together at the loop's start, without
writing a checkpoint. Once training runs, a second SIGTERM/SIGINT (at least ``REPEAT_S`` after the
first: one ``scancel`` or Ctrl-C reaches a process more than once, directly and forwarded) ends it at
once; the last checkpoint stays as it was.

Signals reach a watcher thread through :func:`signal.set_wakeup_fd`, so a main thread blocked in C
(a rendezvous, a collective waiting for a peer, a read) cannot delay an exit at once.
"""
from __future__ import annotations

import _thread
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..config import signal_name
from ..errors import UserError
from ..fsutil import atomic_write_text
from .environment import process_rank

EXIT_PREEMPTED = 3  # stopped by a signal (after saving a checkpoint): run the same command to resume
MARKER = "PREEMPTED"
MARKER_ENV = "DDP_TRAINER_PREEMPT_MARKER"  # an extra marker path (set by the sbatch scripts)
READY_SUFFIX = ".ready"  # <marker>.ready: this node's ranks handle stop signals (the batch shell waits for it)
DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM", "SIGINT")
WARNING_SIGNALS = frozenset({"SIGUSR1"})  # a warning before the end: repeats are harmless, it never exits at once
REPEAT_S = 2.0  # a second SIGTERM/SIGINT sooner than this is the same request arriving twice
_CANCEL_RANK = 64  # in the rank agreement a cancel (TERM/INT) outranks a warning (USR1): encoded above 64
_WRITE_FAILED = 1 << 20  # in the rank agreement: rank 0's last background checkpoint write failed

_activity: list[str] = []  # what start-up is doing now (named when a signal ends it), innermost last


@contextlib.contextmanager
def doing(what: str) -> Iterator[None]:
    """Name what start-up is busy with, for the line an exit at once prints ("waiting for ...")."""
    _activity.append(what)
    try:
        yield
    finally:
        _activity.pop()


def current_activity() -> str:
    return _activity[-1] if _activity else "starting up"


def stop_exit_code() -> int:
    """The exit code of a stop at a checkpoint: 3, or 0 under the sbatch scripts (they set
    ``$DDP_TRAINER_PREEMPT_MARKER``; the marker, not the exit code, tells the batch shell what happened,
    and a non-zero task would make srun and torchrun report a crash and kill the other tasks)."""
    return 0 if os.environ.get(MARKER_ENV) else EXIT_PREEMPTED


class Preempted(UserError):
    """Raised on every rank after the ranks agreed to stop (and saved, when ``saved``)."""

    def __init__(self, signal_name: str, where: str, saved: bool = True) -> None:
        what = "after saving a checkpoint" if saved else "before training started (nothing new to save)"
        super().__init__(f"stopped by {signal_name} {what} ({where}); run the same command to resume")
        self.signal_name = signal_name
        self.exit_code = stop_exit_code()


def parse_signals(names: Sequence[str]) -> list[signal.Signals]:
    """``preempt.signals`` (validated by the config) as signals."""
    return [signal.Signals[signal_name(name)] for name in names]


def _say(text: str) -> None:
    """One line on stderr from rank 0, written directly (safe from any thread, any moment)."""
    if process_rank(os.environ) == 0:
        os.write(2, (text + "\n").encode("utf-8", "backslashreplace"))


@dataclass(frozen=True)
class Agreement:
    """What the ranks agreed on at a step boundary, from the max of their codes: the stop signal
    any rank received (a cancel outranks a warning), and whether rank 0's background checkpoint
    write failed (so every rank stops at the next step with its message, not at the next save)."""

    signal: str | None
    write_failed: bool

    @classmethod
    def decode(cls, code: int) -> "Agreement":
        write_failed = bool(code & _WRITE_FAILED)
        code &= _WRITE_FAILED - 1
        if not code:
            return cls(None, write_failed)
        return cls(signal.Signals(code % _CANCEL_RANK if code > _CANCEL_RANK else code).name, write_failed)


class StopRequest:
    """The stop signals this process has received, and what they mean in the current phase.

    :meth:`install` (main thread) replaces the signals' handlers; :meth:`arm` marks the start of the
    training loop. ``received`` is the signal the next agreement reports: the first one, except that
    a cancel (SIGTERM/SIGINT) replaces an earlier warning (SIGUSR1).
    """

    def __init__(self, signals: Sequence[signal.Signals], hard_exit: bool = True) -> None:
        """``hard_exit``: a signal that ends the run at once ends the process (the command line);
        False (the Python API): it interrupts the main thread instead (KeyboardInterrupt), and the
        caller's interpreter lives on."""
        self.signals = list(signals)
        self.hard_exit = hard_exit
        self._wakeup_before = -1
        self.received: str | None = None
        self.armed = False
        self._first_at = 0.0
        self._previous: dict[signal.Signals, Any] = {}
        self._pair: tuple[socket.socket, socket.socket] | None = None
        self._lock = threading.Lock()
        self.orphan_deadline_s = 120.0  # preempt.orphan_deadline_s
        self._deadline_armed = False
        self._thread: threading.Thread | None = None  # the run's thread, when installed off the main thread
        self._thread_name: str | None = None
        self._excepthook_before: Any = None

    @classmethod
    def early(cls) -> "StopRequest":
        """Installed first thing in the launcher (before torch is imported), with the default signals,
        so that a signal during the slow imports is handled, not fatal; :meth:`configure` then applies
        ``preempt.signals``."""
        return cls(parse_signals(DEFAULT_SIGNALS)).install()

    def install(self) -> "StopRequest":
        """Handle the stop signals from now on. In the main thread: the signals' handlers are
        replaced. In another thread (``train()`` called from a thread, a Ray Train worker), where
        Python lets no handler be installed, the run stops at its next step with a checkpoint when
        :meth:`request` is called (``ddp_trainer.request_stop()``), or when the main thread dies of an
        uncaught exception (Ctrl-C's KeyboardInterrupt in ``thread.join()``: the interpreter would
        otherwise wait for the training thread's whole run)."""
        if not self.signals:
            return self
        if threading.current_thread() is not threading.main_thread():
            if self._thread_name is not None:  # configure() installs again: the hook is in place
                return self
            self._thread = threading.current_thread()
            self._thread_name = self._thread.name
            self._excepthook_before = sys.excepthook
            sys.excepthook = self._main_thread_died
            return self
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._pair = (reader, writer)
        self._wakeup_before = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        for s in self.signals:
            self._previous[s] = signal.signal(s, _no_op)
        threading.Thread(target=self._watch, name="stop-signals", daemon=True).start()
        return self

    def configure(self, signals: Sequence[signal.Signals], orphan_deadline_s: float = 120.0) -> "StopRequest":
        """Handle exactly ``signals`` from now on (the ones dropped get their previous handler back).
        ``orphan_deadline_s``: how long a worker whose torchrun agent died may take to stop at a
        checkpoint before it stops at once."""
        self.orphan_deadline_s = orphan_deadline_s
        if self._pair is None:
            self.signals = list(signals)
            return self.install()
        for s in [s for s in self.signals if s not in signals]:
            signal.signal(s, self._previous.pop(s, signal.SIG_DFL))
        for s in signals:
            if s not in self._previous:
                self._previous[s] = signal.signal(s, _no_op)
        self.signals = list(signals)
        return self

    def arm(self) -> None:
        """The training loop starts: from now on the first signal asks for a stop at a checkpoint."""
        self.armed = True

    @property
    def signum(self) -> int:
        """What this rank contributes to the ranks' agreement (max over ranks): 0 when nothing was
        received; a cancel outranks a warning. :func:`decode` turns the max back into a name."""
        if not self.received:
            return 0
        n = int(signal.Signals[self.received])
        return n if self.received in WARNING_SIGNALS else n + _CANCEL_RANK

    def agreement_code(self, write_failed: bool = False) -> int:
        """This rank's part of the stop agreement (the ranks all-reduce it with max; see
        :class:`Agreement`): the signal received, and whether a background write failed."""
        return self.signum | (_WRITE_FAILED if write_failed else 0)

    def _watch(self) -> None:
        assert self._pair is not None
        names = {s.name for s in self.signals}
        while True:
            try:
                data = self._pair[0].recv(64)
            except OSError:
                return
            if not data:
                return
            for num in data:
                try:
                    name = signal.Signals(num).name
                except ValueError:
                    continue
                if name in names:  # other Python-handled signals (SIGCHLD from torch) also arrive here
                    self._on(name)

    def request(self, name: str = "SIGINT") -> None:
        """Ask the run to stop as the signal ``name`` would (from any thread)."""
        self._on(name)

    def _main_thread_died(self, kind: type[BaseException], value: BaseException, tb: Any) -> None:
        """sys.excepthook while the run is off the main thread: the main thread's uncaught exception
        (printed as usual) also stops the run at its next step, and the interpreter waits for that
        stop (after an uncaught KeyboardInterrupt it would otherwise end at once, killing the run
        between checkpoints). A second Ctrl-C while it waits ends the process without saving."""
        (self._excepthook_before or sys.__excepthook__)(kind, value, tb)
        thread = self._thread
        if threading.current_thread() is threading.main_thread() and thread is not None:
            self._on("SIGINT" if issubclass(kind, KeyboardInterrupt) else "SIGTERM",
                     f"the main thread ended with {kind.__name__}")
            _say("waiting for the run to save its checkpoint (Ctrl-C again: stop at once, without saving)")
            # not thread.join(): a join that KeyboardInterrupt broke (Python 3.11, 3.12) has marked the
            # thread stopped although it runs on, so joins return at once; a live thread has a frame
            while thread.ident in sys._current_frames():
                time.sleep(0.05)

    def _on(self, name: str, why: str | None = None) -> None:
        now = time.monotonic()
        if self._thread_name is not None:
            # off the main thread nothing may end the caller's process or interrupt its main thread:
            # every request stops the run at its next step, with a checkpoint
            with self._lock:
                if self.received is None or (self.received in WARNING_SIGNALS and name not in WARNING_SIGNALS):
                    self.received = name
                    _say(f"warning: {why or name} while ddp_trainer.train() runs in thread "
                         f"{self._thread_name!r}: stopping at the next step with a checkpoint")
            return
        if name == "SIGTERM" and _orphaned() and not self._deadline_armed:
            self._deadline_armed = True
            _say(f"error: the torchrun agent (pid {_AGENT[0]}) is gone: stopping at the next step with a "
                 f"checkpoint, at once if that takes over {self.orphan_deadline_s:g} s (preempt.orphan_deadline_s)")
            timer = threading.Timer(self.orphan_deadline_s, self._exit_now, (name, f"the torchrun agent is gone "
                                    f"and the stop did not end within preempt.orphan_deadline_s="
                                    f"{self.orphan_deadline_s:g} s: stopping at once"))
            timer.daemon = True
            timer.start()
        with self._lock:
            if not self.armed and name not in WARNING_SIGNALS:
                self._exit_now(name, f"stopped by {name} during start-up, while {current_activity()}; no "
                                     f"training step ran, so there is nothing new to save (checkpoints "
                                     f"already written are unchanged)")
            if self.received is None:
                self.received, self._first_at = name, now
                return
            if name in WARNING_SIGNALS:
                return
            if self.received in WARNING_SIGNALS or now - self._first_at < REPEAT_S:
                self.received = name  # a cancel replaces a warning; a quick repeat is the same request
                return
            self._exit_now(name, f"second {name}: stopping at once without saving; the run resumes from "
                                 f"its last checkpoint")

    def _exit_now(self, name: str, text: str) -> None:
        _say(f"error: {text}")
        if not self.hard_exit:
            _thread.interrupt_main()  # the API's caller gets a KeyboardInterrupt; its process lives on
            return
        os._exit(128 + int(signal.Signals[name]))

    def uninstall(self) -> None:
        """Put back what :meth:`install` replaced (the handlers, the wakeup fd, sys.excepthook) and end
        the watcher thread: nothing of the run's signal handling is left (the Python API)."""
        if self._thread_name is not None:
            if sys.excepthook == self._main_thread_died:  # not if the caller replaced it meanwhile
                sys.excepthook = self._excepthook_before
            self._thread = self._thread_name = self._excepthook_before = None
        if self._pair is None:
            return
        for s, before in self._previous.items():
            signal.signal(s, before)
        self._previous.clear()
        signal.set_wakeup_fd(self._wakeup_before)
        reader, writer = self._pair
        reader.shutdown(socket.SHUT_RDWR)  # the watcher's recv returns: its thread ends (close alone may not wake it)
        reader.close()
        writer.close()
        self._pair = None

    def finish(self) -> None:
        """The run's outcome is decided: a warning signal from now on is ignored, also while the
        interpreter shuts down (which would otherwise restore the default action: death by signal,
        and a finished run reported as failed). Nothing when :meth:`install` installed nothing (off
        the main thread: Ray Train runs the training function in a thread of its worker)."""
        if self._pair is None:
            return
        for s in self.signals:
            if s.name in WARNING_SIGNALS:
                signal.signal(s, signal.SIG_IGN)


def _no_op(signum: int, frame: Any) -> None:
    """The Python-level handler: the watcher thread acts on the signal (see the module docstring)."""


_AGENT: list[int] = []  # the torchrun agent's pid, once stop_with_parent() has run


def stop_with_parent() -> None:
    """A torchrun worker stops when its agent dies, however it dies (SIGKILL, or a signal it does not
    handle, such as SIGUSR1 to a plain torchrun): the kernel sends the worker SIGTERM (Linux's
    parent-death signal), which stops it at the next step with a checkpoint, as a SIGTERM to the
    worker does, within a bounded time (see :meth:`StopRequest.configure`). A worker never trains
    on alone, and the steps since the last save are not lost."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the agent died before the call
        os._exit(1)
    _AGENT[:] = [parent]


def _orphaned() -> bool:
    """The torchrun agent this worker started under is gone (its parent is someone else now)."""
    return bool(_AGENT) and os.getppid() != _AGENT[0]


def write_ready() -> None:
    """Tell the batch shell that this node's ranks handle stop signals now (local rank 0, after every
    rank joined the process group): a signal it forwarded before this is forwarded once more."""
    _write_node_marker(READY_SUFFIX, f"{os.getpid()}\n")


class _IgnoreSignals:
    """A picklable worker init (a worker started by ``spawn`` or ``forkserver`` receives it pickled)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def __call__(self, worker_id: int) -> None:
        signal.set_wakeup_fd(-1)  # the parent's watcher socket is not this worker's
        for name in self.names:
            signal.signal(signal.Signals[name], signal.SIG_IGN)


def worker_init_ignoring(signals: Sequence[signal.Signals]) -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` (picklable): loader workers ignore the stop signals (the main
    process shuts them down itself), so a signal sent to every process of a job cannot kill them first."""
    return _IgnoreSignals([s.name for s in signals])


def write_marker(output_dir: Path | None, signal_name: str, epoch: int, step: int, saved: bool = True) -> None:
    """Say that the run stopped at a checkpoint: ``<output_dir>/PREEMPTED`` (when ``output_dir`` is
    given: global rank 0) and ``$DDP_TRAINER_PREEMPT_MARKER`` (when set: each node's local rank 0, so
    that the batch shell finds it on its own node without a shared filesystem)."""
    text = json.dumps({"signal": signal_name, "epoch": epoch, "step": step, "saved": saved, "time": time.time(),
                       "slurm_job_id": os.environ.get("SLURM_JOB_ID")}) + "\n"
    if output_dir is not None:
        atomic_write_text(Path(output_dir) / MARKER, text)
    _write_node_marker("", text)


def _write_node_marker(suffix: str, text: str) -> None:
    """Write ``$DDP_TRAINER_PREEMPT_MARKER`` + ``suffix`` when the sbatch scripts set the variable."""
    extra = os.environ.get(MARKER_ENV)
    if extra:
        Path(extra).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(extra + suffix), text)


def clear_marker(output_dir: Path) -> None:
    (Path(output_dir) / MARKER).unlink(missing_ok=True)
