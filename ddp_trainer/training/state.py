"""Where the training loop is: :class:`TrainState`, the loop counters a checkpoint carries."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..checkpoint.format import resume_point


@dataclass
class TrainState:
    """The epoch running (or next to run), samples of it consumed, optimizer steps taken, and the
    epoch's training-loss sums over every rank before this process started the epoch (a mid-epoch
    resume), so that the epoch's ``train_loss`` equals an uninterrupted run's."""

    epoch: int = 0
    position: int = 0
    step: int = 0
    loss_sum: float = 0.0
    loss_count: float = 0.0

    def entries(self, *, epoch_complete: bool, loss_sum: float, loss_count: float) -> dict[str, Any]:
        """The checkpoint's loop entries (top-level keys of format version 1). ``loss_sum`` /
        ``loss_count``: the epoch's sums up to ``position``, over every rank."""
        return {"epoch": self.epoch, "position": self.position, "epoch_complete": epoch_complete,
                "step": self.step, "train_loss_sum": loss_sum, "train_loss_count": loss_count}

    def restore(self, entries: Mapping[str, Any]) -> None:
        """Continue after the checkpoint (the format's resume rule), with the epoch's loss sums when
        it resumes mid-epoch. Foreign files may lack entries (a fresh start for those)."""
        self.epoch, self.position = resume_point(entries)
        self.step = int(entries.get("step", 0) or 0)
        mid_epoch = not bool(entries.get("epoch_complete", True))
        self.loss_sum = float(entries.get("train_loss_sum") or 0.0) if mid_epoch else 0.0
        self.loss_count = float(entries.get("train_loss_count") or 0.0) if mid_epoch else 0.0

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.position, self.loss_sum, self.loss_count = epoch, 0, 0.0, 0.0
