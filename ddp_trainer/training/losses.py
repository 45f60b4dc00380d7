"""The training loss per sample (``train.loss``): cross-entropy, or timm's ``BinaryCrossEntropy``
semantics (``train.loss=bce``: the "ResNet strikes back" recipes). Validation always reports plain
cross-entropy (:func:`.engine.evaluate`), so runs with either loss compare on one figure."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..config import TrainConfig

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels or soft targets) -> (B,)


def cross_entropy(label_smoothing: float = 0.0) -> Loss:
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    return loss


def binary_cross_entropy(smoothing: float = 0.0, target_threshold: Optional[float] = None) -> Loss:
    """timm's ``BinaryCrossEntropy(smoothing, target_threshold)`` per sample: class labels become
    one-hot targets with ``smoothing / C`` off and ``1 - smoothing + smoothing / C`` on; MixUp/CutMix's
    soft targets (unsmoothed mixes of one-hots here) get the same affine smoothing, which equals
    mixing timm's smoothed one-hots as its Mixup does; then targets above ``target_threshold`` become
    1, the rest 0. The loss of a sample is the mean over classes, so the sum over a batch weighted
    1/B is timm's mean over the batch and the classes."""
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        classes = logits.shape[-1]
        if targets.shape != logits.shape:
            targets = F.one_hot(targets.long(), classes).to(logits.dtype)
        if smoothing:
            targets = targets * (1.0 - smoothing) + smoothing / classes
        if target_threshold is not None:
            targets = targets.gt(target_threshold).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)
    return loss


def training_loss(cfg: TrainConfig) -> Loss:
    """``train.loss`` with its settings (``train.label_smoothing`` is the smoothing of either)."""
    if cfg.loss == "bce":
        return binary_cross_entropy(cfg.label_smoothing, cfg.bce_target_threshold)
    return cross_entropy(cfg.label_smoothing)
