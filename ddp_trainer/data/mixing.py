"""MixUp / CutMix of training batches (``data.mixup_alpha``, ``data.cutmix_alpha``), with
torchvision.transforms.v2's ``MixUp`` / ``CutMix`` (one of them per batch when both are set), giving
soft targets for the loss.

torchvision draws from torch's global generator; here every micro-batch runs under ``fork_rng``
seeded from ``(seed, optimizer step, rank, micro-batch)``, so a run is reproducible, a resume is
exact, and nothing else's random numbers shift. Samples are paired within each rank's micro-batch.
"""
from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

from .transforms import sample_seed

_STREAM = 0x6D6978  # keeps these seeds apart from the per-sample augmentation seeds


class BatchMixer:
    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, seed: int, rank: int) -> None:
        choices = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []) + (
            [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else [])
        self.transform: Any = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
        self.seed, self.rank = seed, rank

    def seed_of(self, step: int, micro: int) -> int:
        """The generator seed of micro-batch ``micro`` of global optimizer step ``step`` on this rank."""
        return sample_seed(self.seed ^ _STREAM, step, self.rank * 4096 + micro)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int, micro: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed images, soft targets [B, classes], each row summing to 1)."""
        with torch.random.fork_rng(devices=[]):  # the CPU generator is restored afterwards
            # the CPU's generator only (v2's MixUp / CutMix draw there): torch.manual_seed would also
            # reseed every GPU's generator, and never restore them
            torch.default_generator.manual_seed(self.seed_of(step, micro))
            return self.transform(images, labels)
