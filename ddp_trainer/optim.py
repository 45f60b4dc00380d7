"""Optimizers and the learning-rate schedule.

The schedule is a pure function of training progress measured in samples (epoch + fraction), not of
a step counter: it stays right when a run resumes with a different number of processes, where the
number of steps per epoch changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import OptimConfig, SchedConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW; no weight decay on biases and normalisation weights."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False)
    return torch.optim.AdamW(groups, lr=cfg.lr)


@dataclass(frozen=True)
class LRSchedule:
    """``lr(progress)`` with ``progress`` in epochs (float): linear warmup, then cosine or step."""

    base_lr: float
    cfg: SchedConfig
    total_epochs: int

    def lr(self, progress: float, step_fraction: float = 0.0) -> float:
        """The lr of a step starting at ``progress`` epochs and covering ``step_fraction`` of an epoch."""
        warm = self.cfg.warmup_epochs
        factor = 1.0
        if warm > 0 and progress < warm:
            factor = min(1.0, (progress + step_fraction) / warm)
        if self.cfg.name == "cosine":
            span = max(self.total_epochs - warm, 1e-9)
            t = min(max(progress - warm, 0.0) / span, 1.0)
            floor = self.cfg.min_lr
            return floor + (self.base_lr * factor - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.cfg.name == "step":
            return self.base_lr * factor * self.cfg.gamma ** int(progress // self.cfg.step_epochs)
        return self.base_lr * factor

    def state_dict(self) -> dict[str, Any]:
        """What the schedule depends on (it has no hidden counters)."""
        return {"name": self.cfg.name, "base_lr": self.base_lr, "warmup_epochs": self.cfg.warmup_epochs,
                "total_epochs": self.total_epochs}
