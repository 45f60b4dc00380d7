"""When to save and what: the save policy (every_epochs, every_steps, best, last, stop) and the
writes of the state assembled from a :class:`~ddp_trainer.state.StateRegistry`.

Every rank calls :meth:`CheckpointManager.save` at the same points (the registry's collectives);
only global rank 0 has a writer (a rank-0 decision made when the manager is built).
"""
from __future__ import annotations

import logging
from pathlib import Path

from .reader import AsyncCheckpointWriter, CheckpointWriter
from ..config import CheckpointConfig
from ..launch.dist import Dist
from .registry import StateRegistry

log = logging.getLogger("ddp_trainer")


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, folder: Path, dist: Dist, registry: StateRegistry,
                 total_epochs: int) -> None:
        self.cfg = cfg
        self.dist = dist
        self.registry = registry
        self.total_epochs = total_epochs
        writer_cls = AsyncCheckpointWriter if cfg.async_ else CheckpointWriter
        self.writer = writer_cls(folder, cfg.keep_last) if dist.is_main else None
        self.last_saved: str | None = None  # what this run's last save held ("epoch 1, 64 samples in")

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

    def save(self, *, epoch: int, what: str, epoch_file: bool = False, best: bool = False,
             wait: bool = False, also: tuple[str, ...] = (), remove: tuple[str, ...] = ()) -> None:
        """Assemble the state (every rank) and write it (rank 0). A failed earlier background write
        fails every rank here; ``wait`` blocks until this save is on disk. ``also`` / ``remove``: more
        names for this file, and names to remove once it is in place (``checkpoint.keep_best``)."""
        self.check()
        state = self.registry.state_dict(self.dist.is_main)
        if self.writer is not None:
            assert state is not None
            path = self.writer.save(state, epoch_file=epoch if epoch_file else None, best=best, also=also,
                                    remove=remove)
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

    def failed_locally(self) -> bool:
        """Rank 0: its last background write has failed (no wait, no collective)."""
        return self.writer is not None and bool(getattr(self.writer, "failed", False))

    def wait_local(self) -> None:
        """Rank 0: let the save in flight finish (no collective)."""
        if self.writer is not None:
            self.writer.wait()
