"""When to save and what: the save policy (every_epochs, every_steps, best, last, stop), the ranking
of the best epochs (``checkpoint.monitor``, ``mode``, ``keep_best``), and the writes of the state
assembled from a :class:`~.registry.StateRegistry`.

Every rank calls :meth:`CheckpointManager.save` at the same points (the registry's collectives);
only global rank 0 has a writer (a rank-0 decision made when the manager is opened).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config import CheckpointConfig
from ..launch.dist import Dist
from .format import monitored_metric
from .registry import LoadContext, SaveContext, StateRegistry
from .writer import AsyncCheckpointWriter, CheckpointWriter

log = logging.getLogger("ddp_trainer")


@dataclass(frozen=True)
class Judgement:
    """What one epoch's monitored value means for the files: a new best, and with ``keep_best`` > 1
    the names this epoch's file also gets and the names of files that left the K best."""

    is_best: bool
    also: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()


@dataclass
class BestRanking:
    """The best monitored value so far and the K best epochs (a component: entries ``best`` and
    ``best_k``, ``[[value, epoch], ...]`` best first). A file ranked by another metric or mode is
    not continued: the ranking starts anew, and ``replaced`` says what the file's ranking was."""

    monitor: str  # checkpoint.monitor
    mode: str  # "min" | "max"
    keep: int  # checkpoint.keep_best
    best: float | None = None
    best_k: list = field(default_factory=list)
    replaced: str | None = None  # "val_loss (min)": the restored file was ranked by that

    def judge(self, value: float, epoch: int) -> Judgement:
        """Rank epoch ``epoch``'s ``value`` (and remember it)."""
        is_best = self._better(value)
        if is_best:
            self.best = value
        if self.keep <= 1 or math.isnan(value):
            return Judgement(is_best)
        kept = [list(e) for e in self.best_k]
        ranked = sorted(kept + [[value, epoch]], key=lambda e: e[0],
                        reverse=self.mode == "max")[:self.keep]  # stable: on a tie the older stays
        self.best_k = ranked
        if [value, epoch] not in ranked:
            return Judgement(is_best)
        gone = tuple(f"best_epoch_{e:04d}.pt" for v, e in kept if [v, e] not in ranked)
        return Judgement(is_best, (f"best_epoch_{epoch:04d}.pt",), gone)

    def _better(self, value: float) -> bool:
        if self.best is None or math.isnan(self.best):
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def save(self, ctx: SaveContext) -> dict[str, Any]:
        return {"best": self.best, "best_k": [list(e) for e in self.best_k]}

    def load(self, entries: Mapping[str, Any], ctx: LoadContext) -> None:
        theirs = (monitored_metric(entries), ((entries.get("config") or {}).get("checkpoint") or {}).get("mode"))
        if ctx.checkpoint.ours and theirs[0] is not None and theirs != (self.monitor, self.mode):
            self.replaced = f"{theirs[0]} ({theirs[1]})"
            log.warning("resume: the checkpoint's best epochs were ranked by %s, this run ranks by %s (%s): "
                        "the ranking starts anew; the files the old one kept stay", self.replaced, self.monitor,
                        self.mode)
            self.best, self.best_k = None, []
            return
        self.best = entries.get("best")
        self.best_k = [list(e) for e in entries.get("best_k") or []]


class CheckpointManager:
    """The run's checkpoints: the save policy, the best ranking (registered as a component), and
    rank 0's writer."""

    def __init__(self, cfg: CheckpointConfig, folder: Path, dist: Dist, registry: StateRegistry,
                 total_epochs: int) -> None:
        self.cfg = cfg
        self.dist = dist
        self.registry = registry
        self.total_epochs = total_epochs
        self.ranking = BestRanking(cfg.monitor, cfg.mode, cfg.keep_best)
        registry.register("best", self.ranking, flat=True)
        self.folder = folder
        self.writer: CheckpointWriter | AsyncCheckpointWriter | None = None  # rank 0, from open(): building it touches the folder
        self.last_saved: str | None = None  # what this run's last save held ("epoch 1, 64 samples in")

    def open(self) -> None:
        """Start rank 0's writer (it creates the folder and clears a killed run's temporary files):
        called once the run has decided how it starts, so that a refused resume changes nothing."""
        if self.dist.is_main and self.writer is None:
            writer_cls = AsyncCheckpointWriter if self.cfg.async_ else CheckpointWriter
            self.writer = writer_cls(self.folder, self.cfg.keep_last)

    # -- policy ------------------------------------------------------------------------------------

    def should_save_step(self, step: int, position: int, epoch_size: int) -> bool:
        """A mid-epoch ``last.pt`` every ``checkpoint.every_steps`` (not at the epoch's end: the
        epoch save follows)."""
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0 and position < epoch_size

    def should_save_epoch(self, epoch: int, is_best: bool, stopping: bool) -> bool:
        """Every ``checkpoint.every_epochs``, the last epoch, a new best, and before a stop."""
        every = bool(self.cfg.every_epochs) and (epoch + 1) % self.cfg.every_epochs == 0
        return every or epoch == self.total_epochs - 1 or is_best or stopping

    # -- writes ------------------------------------------------------------------------------------

    def save(self, *, epoch: int, what: str, end_of_epoch: bool = False, judgement: Judgement | None = None,
             wait: bool = False) -> None:
        """Assemble the state (every rank) and write it (rank 0). ``end_of_epoch``: the epoch is
        complete (the file is also ``epoch_NNNN.pt``); ``judgement``: the names a best epoch's file
        also gets and those to remove once it is in place. A failed earlier background write fails
        every rank here; ``wait`` blocks until this save is on disk."""
        self.check()
        state = self.registry.state_dict(SaveContext(epoch_complete=end_of_epoch), self.dist.is_main)
        if self.writer is not None:
            assert state is not None
            j = judgement or Judgement(False)
            path = self.writer.save(state, epoch_file=epoch if end_of_epoch else None, best=j.is_best,
                                    also=j.also, remove=j.remove)
            log.info("checkpoint: %s (epoch %d, %s)", path.name, epoch, what)
        self.last_saved = f"epoch {epoch}, {what}"
        if wait:
            self.finish()

    def check(self) -> None:
        """Every rank learns whether rank 0's last background write failed."""
        self.dist.main_then_broadcast(self.writer.check if self.writer is not None else lambda: None)

    def finish(self) -> None:
        """Wait for the save in flight (rank 0) and fail every rank if it failed."""
        self.dist.main_then_broadcast(self.writer.close if self.writer is not None else lambda: None)

    def keep_replaced_best(self) -> None:
        """After a resume whose best ranking was replaced (another monitor or mode): rank 0 renames
        best.pt, the old ranking's best, to ``best_<metric>_<mode>.pt`` before the new ranking's first
        best takes its name."""
        old = self.ranking.replaced
        if old is None or self.writer is None or not (self.writer.folder / "best.pt").exists():
            return
        metric, mode = old.replace("(", "").replace(")", "").split()
        target = self.writer.folder / f"best_{metric}_{mode}.pt"
        n = 1
        while target.exists():
            n += 1
            target = self.writer.folder / f"best_{metric}_{mode}.{n}.pt"
        (self.writer.folder / "best.pt").rename(target)
        log.info("checkpoint: best.pt (best by %s) kept as %s", old, target.name)

    def failed_locally(self) -> bool:
        """Rank 0: its last background write has failed (no wait, no collective)."""
        return self.writer is not None and bool(getattr(self.writer, "failed", False))

    def wait_local(self) -> None:
        """Rank 0: let the save in flight finish (no collective)."""
        if self.writer is not None:
            self.writer.wait()
