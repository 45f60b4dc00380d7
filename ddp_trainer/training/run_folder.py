"""``output_dir`` as a run uses it: claimed (layout checked, no run clobbered, locked) before anything
is written there, then opened (``config.yaml``, ``train.log`` with the records logged so far, the
old stop marker cleared) once the run has decided how it starts, and ``metrics.jsonl``.

Built on every rank; only global rank 0 touches the folder (a rank-0 decision made here, once).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

from ..checkpoint.discovery import has_checkpoints
from ..config import Config, dump
from ..errors import CheckpointError, ConfigError, UserError
from ..fsutil import atomic_write_text, check_writable
from ..launch.dist import Dist
from ..launch.runlock import RunLock
from ..launch.signals import clear_marker
from ..runlog import EarlyRecords, MetricsFile, add_file_log, remove_file_log

NCCL_TRACE = "nccl_trace"  # NCCL's flight-recorder dumps on a collective timeout (each node's own)
REPLACED = "replaced"  # resume=none over an earlier run: that run's files, moved here (replaced/<UTC time>/)
REPLACED_KEPT = 1  # earlier runs kept in replaced/: overwrite=true asked for the run to be replaced
_ASIDE = re.compile(r"^\d{8}-\d{6}(\.\d+)?$")  # replaced/<UTC time>[.N]/
PREVIOUS_RUN = ("checkpoints", "metrics.jsonl", "metrics.csv", "train.log", "tensorboard", "config.yaml", "PREEMPTED",
                "wandb")
log = logging.getLogger("ddp_trainer")

# what a run writes in output_dir, and whether each is a folder
OUTPUT_ENTRIES = {"checkpoints": True, "tensorboard": True, "train.log": False, "metrics.jsonl": False,
                  "metrics.csv": False, "wandb": True,
                  "config.yaml": False, "PREEMPTED": False, ".lock": False, NCCL_TRACE: True, REPLACED: True}


def check_output_layout(out: Path) -> None:
    """Refuse (exit 2, before anything is written) an output_dir where a name the run writes is taken
    by the wrong kind of entry: ``checkpoints`` a file, ``train.log`` a folder, output_dir a file."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir '{out}' is a file, not a folder; choose another output_dir")
    for name, folder in OUTPUT_ENTRIES.items():
        path = out / name
        if path.exists() and path.is_dir() != folder:
            want, found = ("a folder", "a file") if folder else ("a file", "a folder")
            raise ConfigError(f"'{path}' is {found}, but the run writes {want} there; move it out of "
                              f"output_dir '{out}' or choose another output_dir")


def _unwritable(folder: Path, exc: OSError) -> UserError:
    what = "checkpoint folder" if folder.name == "checkpoints" else "output_dir"
    return UserError(f"{what} '{folder}' cannot be written ({exc.strerror}); make it writable or choose "
                     f"another output_dir")


class RunFolder:
    def __init__(self, cfg: Config, dist: Dist, scratch: bool = False) -> None:
        """``scratch``: the folder of ``--debug`` runs, whose earlier run is deleted, not kept."""
        self.cfg, self.dist, self.scratch = cfg, dist, scratch
        self.path = Path(cfg.output_dir)
        self.checkpoints = self.path / "checkpoints"
        self.lock: RunLock | None = None  # rank 0, from claim() until close()
        self._early = EarlyRecords() if dist.is_main else None  # log records before train.log opens
        self._file_log: logging.Handler | None = None  # rank 0's train.log, from open() until close()
        self.metrics = MetricsFile(self.path / "metrics.jsonl") if dist.is_main else None

    def claim(self) -> None:
        """Every rank: refuse to clobber a run, then rank 0 holds output_dir's lock for the whole run."""
        with self.dist.waiting("rank 0 to lock output_dir"):
            self.dist.main_then_broadcast(self._claim)

    def _claim(self) -> None:
        check_output_layout(self.path)
        if self.cfg.resume == "none" and has_checkpoints(self.checkpoints) and not self.cfg.overwrite:
            raise CheckpointError(
                f"output_dir '{self.path}' already holds checkpoints and resume=none would overwrite them; "
                f"use resume=auto to continue that run, another output_dir, or overwrite=true")
        try:
            self.lock = RunLock(self.path).acquire()
        except OSError as exc:
            raise _unwritable(self.path, exc) from None
        # the lock may be taken in a folder that takes no new file (an old .lock, a read-only mount):
        # found now, not when the first epoch's checkpoint is written
        for folder in (self.path, self.checkpoints):
            try:
                if folder.is_dir():
                    check_writable(folder)
            except OSError as exc:
                raise _unwritable(folder, exc) from None

    def open(self) -> None:
        """Every rank, once the run knows how it starts: rank 0 saves the resolved config, starts
        train.log (with what was logged before) and clears an old stop marker."""
        with self.dist.waiting("rank 0 to prepare output_dir"):
            self.dist.main_then_broadcast(self._open)
        if self.dist.backend == "nccl" and self.dist.env.is_local_main:
            (self.path / NCCL_TRACE).mkdir(parents=True, exist_ok=True)

    def _open(self) -> None:
        if self.cfg.resume == "none":
            self._set_aside_previous_run()
        try:
            atomic_write_text(self.path / "config.yaml", dump(self.cfg))
        except OSError as exc:
            raise _unwritable(self.path, exc) from None
        self._file_log = add_file_log(self.path / "train.log", self.dist.rank, self._early)
        self._early = None
        clear_marker(self.path)

    def _set_aside_previous_run(self) -> None:
        """Starting over (``resume=none``, with ``overwrite=true`` where checkpoints exist): the earlier
        run's files move to ``replaced/<UTC time>/``, so that nothing of it is where this run's resume
        looks, and nothing is lost. A scratch folder's earlier run is deleted."""
        found = [n for n in PREVIOUS_RUN if (self.path / n).exists()]
        if not found:
            return
        if self.scratch:
            for name in found:
                if (self.path / name).is_dir():
                    shutil.rmtree(self.path / name)
                else:
                    (self.path / name).unlink()
            return
        first = aside = self.path / REPLACED / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        n = 1
        while aside.exists():  # two starts over within a second
            n += 1
            aside = first.with_name(f"{first.name}.{n}")
        aside.mkdir(parents=True)
        for name in found:
            os.rename(self.path / name, aside / name)
        log.warning("resume=none: the earlier run's %s moved to %s (nothing of it is resumed or overwritten)",
                    ", ".join(found), aside)
        self._bound_replaced()

    def _bound_replaced(self) -> None:
        """``replaced/`` keeps the last :data:`REPLACED_KEPT` earlier runs (each start over would add a
        whole copy of a run); older ones are deleted, named in the log, once the newest is in place.
        Entries not named by a start over are left alone."""
        folder = self.path / REPLACED
        runs = sorted((p for p in folder.iterdir() if p.is_dir() and _ASIDE.match(p.name)),
                      key=lambda p: (p.name.split(".")[0], int(p.name.partition(".")[2] or 1)))
        for old in runs[:-REPLACED_KEPT]:
            shutil.rmtree(old)
            log.warning("resume=none: deleted %s, an older run set aside (replaced/ keeps the last %d)", old,
                        REPLACED_KEPT)

    def close(self) -> None:
        """Let go of held log records, train.log and output_dir's lock (the process's end releases
        it too)."""
        if self._file_log is not None:
            remove_file_log(self._file_log)
            self._file_log = None
        if self._early is not None:
            self._early.detach()
            self._early = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
