"""Where each epoch's metrics row goes besides ``metrics.jsonl``: experiment trackers (``log.wandb``,
``log.mlflow``: global rank 0 only) and Ray Train's ``report`` (every rank, under Ray).

A tracker logs the resolved config once, when its run is created, and every epoch's row with the
epoch as its step. Its run id travels in the checkpoints, so a resumed or requeued run continues the
same tracker run; and a tracker skips the epochs its run already holds (a run killed after logging
an epoch but before its checkpoint trains that epoch again, to the same values, since resume is
exact): every epoch is in the tracker's history exactly once. A tracker that cannot start or log
(package missing, server unreachable) is one warning line, never a failed run.

A tracker never holds up the ranks: on rank 0 each one starts and logs in a thread of its own, fed
by a queue (:class:`QueuedTracker`), so the training loop only hands rows over. The loop waits for
a tracker twice, each time at most ``wait_s`` (:func:`tracker_wait_s`: under half of
``dist.timeout_s``, so that the other ranks' next collective cannot time out): for its start (its run
id goes into the checkpoints) and for its close. A failed log call is tried again
(:data:`RETRY_WAITS_S`) before the tracker is given up with one warning.
"""
from __future__ import annotations

import importlib
import logging
import os
import queue
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from .config import Config, flatten

log = logging.getLogger("ddp_trainer")


class EpochSink(Protocol):
    """Something that receives each epoch's metrics row."""

    def epoch(self, row: dict[str, Any]) -> None: ...

    def catch_up(self, rows: list[dict[str, Any]]) -> None:
        """On a resume: the rows ``metrics.jsonl`` keeps from before it (rank 0 only)."""

    def close(self, finished: bool) -> None: ...


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step")}


def _why(exc: BaseException) -> str:
    """An exception as one short line: its type and its message's first line."""
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


RETRY_WAITS_S = (1.0, 4.0)  # the pauses before a failed log call is tried again (then the tracker is given up)
TRACKER_WAIT_S = 60.0  # the longest the loop waits for a tracker's start or close (less under a short dist.timeout_s)


class Tracker:
    """One tracker's run: ``run_id`` (kept in checkpoints) and the epochs it already holds."""

    name = ""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.logged: set[int] = set()
        self._failed = False

    def epoch(self, row: dict[str, Any]) -> None:
        """Log ``row`` (in the tracker's thread: it may take long); a failure is tried again after
        each of :data:`RETRY_WAITS_S` (a server that blinked), then the tracker is given up with one
        warning."""
        if self._failed or row["epoch"] in self.logged:
            return
        for attempt in range(len(RETRY_WAITS_S) + 1):
            try:
                self._log(row)
                self.logged.add(row["epoch"])
                return
            except Exception as exc:  # noqa: BLE001 - a tracker never fails the run
                if attempt < len(RETRY_WAITS_S):
                    time.sleep(RETRY_WAITS_S[attempt])
                    continue
                self._failed = True
                log.warning("log.%s: cannot log epoch %d after %d tries (%s); the run goes on without it", self.name,
                            row["epoch"], attempt + 1, _why(exc))

    def catch_up(self, rows: list[dict[str, Any]]) -> None:
        """Log the earlier epochs this tracker's run lacks (a kill can cost a tracker what it had not
        written yet: W&B's offline writer buffers until the run finishes)."""
        missing = [row for row in rows if row.get("epoch") not in self.logged]
        for row in missing:
            self.epoch(row)
        if missing:
            log.info("log.%s: logged epoch(s) %s from metrics.jsonl (its run lacked them)", self.name,
                     [row["epoch"] for row in missing])

    def _log(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self, finished: bool) -> None:
        raise NotImplementedError


class WandbTracker(Tracker):
    """Weights & Biases. Offline (the default) writes ``<output_dir>/wandb/offline-run-*-<id>/``;
    ``wandb sync`` uploads them later, into one run."""

    name = "wandb"

    def __init__(self, cfg: Config, folder: Path, run_id: str | None) -> None:
        super().__init__()
        wandb = importlib.import_module("wandb")
        opts = cfg.log
        (folder / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=opts.wandb_project, name=opts.wandb_name or folder.name,
                              tags=list(opts.wandb_tags), mode=opts.wandb_mode, dir=str(folder), id=run_id,
                              resume="allow" if run_id else None, config=cfg.to_dict(),
                              settings=wandb.Settings(console="off", silent=True))
        self.run_id = self.run.id
        self.logged = (_wandb_offline_steps(folder / "wandb", self.run_id) if opts.wandb_mode == "offline"
                       else set(range(int(getattr(self.run, "step", 0) or 0))))

    def _log(self, row: dict[str, Any]) -> None:
        self.run.log(_numbers(row), step=int(row["epoch"]), commit=True)  # the row is whole: written now, not at the next step

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


def _wandb_offline_steps(folder: Path, run_id: str) -> set[int]:
    """The steps earlier offline runs with this id wrote (W&B merges them on sync; a step written
    twice would be two rows of that epoch)."""
    records = importlib.import_module("wandb.proto.wandb_internal_pb2")
    steps: set[int] = set()
    for path in sorted(folder.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        settled(path)
        for data in wandb_file_records(path):
            rec = records.Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") == "history" and rec.history.HasField("step"):
                steps.add(int(rec.history.step.num))
    return steps


def settled(path: Path, quiet_s: float = 0.3, limit_s: float = 5.0) -> None:
    """Wait until ``path`` has stopped growing for ``quiet_s`` (at most ``limit_s``): ``run.finish()``
    returns before wandb-core has written the file's last blocks (seen here: 131072 of 142753 bytes on
    disk when finish returned, the rest a moment later), so a run resumed in the same process (a
    notebook) would read a file still being written."""
    deadline = time.monotonic() + limit_s
    size, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = path.stat().st_size if path.exists() else -1
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.05)


_WANDB_MAGIC = b":W&B\xe1\xbe\x00"  # ident, magic 0xBEE1 (little-endian), version 0
_BLOCK, _RECORD_HEAD = 32768, 7  # the LevelDB log layout: 32 KiB blocks; crc32, length, kind per record
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_file_records(path: Path) -> Iterator[bytes]:
    """The serialized records of a W&B run file (``run-<id>.wandb``), in order; a torn tail (the
    writer was killed mid-record) ends the scan. wandb 0.19+ writes these files from its Go core
    and no longer ships a Python reader, so this follows the layout the files have: a 7-byte header,
    then LevelDB-log blocks whose records carry ``zlib.crc32(kind + data)``."""
    raw = Path(path).read_bytes()
    if not raw.startswith(_WANDB_MAGIC):
        raise ValueError(f"{path}: not a W&B run file (its first bytes are {raw[:7]!r})")
    pos, parts = len(_WANDB_MAGIC), []
    while True:
        left = _BLOCK - pos % _BLOCK
        if left < _RECORD_HEAD:  # a block's last bytes are padding when a record head does not fit
            pos += left
            continue
        if pos + _RECORD_HEAD > len(raw):
            return
        crc, length, kind = struct.unpack_from("<IHB", raw, pos)
        data = raw[pos + _RECORD_HEAD: pos + _RECORD_HEAD + length]
        if kind == 0 or len(data) < length or zlib.crc32(bytes([kind]) + data) != crc:
            return
        pos += _RECORD_HEAD + length
        if kind == _FULL:
            yield data
        elif kind == _FIRST:
            parts = [data]
        elif kind == _MIDDLE:
            parts.append(data)
        elif kind == _LAST:
            yield b"".join(parts + [data])
            parts = []


class MlflowTracker(Tracker):
    """MLflow through its client (no process-wide active run: a notebook may train twice)."""

    name = "mlflow"

    def __init__(self, cfg: Config, folder: Path, run_id: str | None) -> None:
        super().__init__()
        tracking = importlib.import_module("mlflow.tracking")
        entities = importlib.import_module("mlflow.entities")
        self._Metric, self._Param = entities.Metric, entities.Param
        self.client = tracking.MlflowClient(tracking_uri=mlflow_uri(cfg.log.mlflow_uri))
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self.logged = {int(m.step) for m in self.client.get_metric_history(run_id, "val_loss")}
            return
        name = cfg.log.mlflow_experiment
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment, run_name=folder.name).info.run_id
        params = [self._Param(k, str(v)[:6000]) for k, v in sorted(flatten(cfg.to_dict()).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i: i + 100])

    def _log(self, row: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._Metric(k, v, now, int(row["epoch"])) for k, v in _numbers(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


def mlflow_uri(configured: str | None) -> str:
    """The tracking URI: ``log.mlflow_uri``, else ``MLFLOW_TRACKING_URI``, else ``./mlruns`` (a file
    store; MLflow 3 asks for ``MLFLOW_ALLOW_FILE_STORE=true`` before it opens one, which is set here
    unless the user set it: the file store is what this key promises, and it needs no database)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"
    if "://" not in uri or uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if "://" not in uri:
            uri = Path(uri).resolve().as_uri()
    return uri


def tracker_wait_s(cfg: Config) -> float:
    """How long the training loop waits at most for a tracker's start or close: :data:`TRACKER_WAIT_S`,
    and under half of ``dist.timeout_s`` (the other ranks wait at their next collective meanwhile)."""
    return min(TRACKER_WAIT_S, cfg.dist.timeout_s / 2)


def _start_one(cls: type, extra: str, cfg: Config, folder: Path, run_id: str | None) -> Tracker | None:
    """Start one tracker (in its thread), or None after one warning."""
    try:
        tracker = cls(cfg, folder, run_id)
    except ImportError as exc:
        log.warning("log.%s=true but %s is not installed (pip install -e '.[%s]'); the run goes on without "
                    "it", cls.name, exc.name or cls.name, extra)
        return None
    except Exception as exc:  # noqa: BLE001 - a tracker that cannot start never fails the run
        log.warning("log.%s: cannot start (%s); the run goes on without it", cls.name, _why(exc))
        return None
    resumed = f", continuing run {tracker.run_id} (epochs {sorted(tracker.logged)} already there)" \
        if run_id else f", run {tracker.run_id}"
    log.info("log.%s: on%s", cls.name, resumed)
    return tracker


class QueuedTracker:
    """A tracker that starts, logs and closes in a thread of its own, fed by a queue: :meth:`epoch`
    and :meth:`catch_up` only hand rows over and never wait. ``run_id``: the tracker run's id once it
    has started (the resumed one until then). Created waiting at most ``wait_s`` for the start;
    :meth:`close` (idempotent) waits at most ``wait_s`` for the rows handed over to be logged, and a
    tracker still busy then is left to finish on its own (one warning; its thread is a daemon)."""

    def __init__(self, name: str, start: Callable[[], Tracker | None], run_id: str | None, wait_s: float) -> None:
        self.name, self.run_id, self.wait_s = name, run_id, wait_s
        self._start = start
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._started = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"tracker-{name}", daemon=True)
        self._thread.start()
        if not self._started.wait(wait_s):
            log.warning("log.%s: still starting after %g s; the run goes on and logs to it once it has started "
                        "(a tracker never holds up the ranks)", name, wait_s)

    def epoch(self, row: dict[str, Any]) -> None:
        self._queue.put(("epoch", dict(row)))

    def catch_up(self, rows: list[dict[str, Any]]) -> None:
        self._queue.put(("catch_up", [dict(r) for r in rows]))

    def close(self, finished: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(("close", finished))
        self._thread.join(self.wait_s)
        if self._thread.is_alive():
            log.warning("log.%s: still busy after %g s; the run ends without waiting for it (rows it had not "
                        "logged yet may be missing from the tracker; metrics.jsonl has them all)",
                        self.name, self.wait_s)

    def _work(self) -> None:
        try:
            tracker = self._start()
        finally:
            self._started.set()
        if tracker is not None:
            self.run_id = tracker.run_id
        while True:
            kind, value = self._queue.get()
            if tracker is None:
                if kind == "close":
                    return
                continue
            try:
                if kind == "epoch":
                    tracker.epoch(value)
                elif kind == "catch_up":
                    tracker.catch_up(value)
                else:
                    tracker.close(value)
                    return
            except Exception as exc:  # noqa: BLE001 - a tracker never fails the run
                log.warning("log.%s: %s failed (%s); the run goes on without it", self.name, kind, _why(exc))
                tracker = None
                if kind == "close":
                    return


def start_trackers(cfg: Config, folder: Path, run_ids: dict[str, str]) -> list[QueuedTracker]:
    """The trackers ``log.*`` asks for (global rank 0), continuing the runs of ``run_ids``, each in
    its own thread (:class:`QueuedTracker`)."""
    wanted = [(WandbTracker, cfg.log.wandb, "wandb"), (MlflowTracker, cfg.log.mlflow, "mlflow")]
    started: list[QueuedTracker] = []
    for cls, on, extra in wanted:
        if on:
            run_id = run_ids.get(cls.name)
            started.append(QueuedTracker(cls.name, lambda c=cls, e=extra, r=run_id: _start_one(c, e, cfg, folder, r),
                                         run_id, tracker_wait_s(cfg)))
    return started


class RayReport:
    """Under Ray Train, every rank reports each epoch's row (``ray.train.report``: every worker
    must, the same number of times)."""

    def __init__(self) -> None:
        self.train = importlib.import_module("ray.train")

    def epoch(self, row: dict[str, Any]) -> None:
        self.train.report(metrics={k: v for k, v in row.items() if v is not None})

    def catch_up(self, rows: list[dict[str, Any]]) -> None:
        """Nothing: Ray keeps what it was reported (and every rank must report alike)."""

    def close(self, finished: bool) -> None:
        """Nothing to close: Ray owns the session."""
