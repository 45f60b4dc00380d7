"""Geometry and augmentation with per-sample, reproducible randomness; normalisation on the device.

Each sample's random choices come from a generator seeded by ``(seed, epoch, sample index)``, never
from a global random stream: the result does not depend on which loader worker handles the sample
or on how many samples were skipped on resume. Transforms work on uint8 tensors; conversion to
float and normalisation happen on the training device (:class:`Normalize`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .timm_augment import is_timm_augment, seeded_timm, timm_augment


def _seeded(transform: Any, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Run a torchvision transform (which draws from torch's global generator) on numbers drawn from
    the sample's own generator: the result depends on (seed, epoch, sample) only, never on the
    worker, the order, or what ran before; the global generator is left as it was."""
    child = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):  # the CPU generator is restored afterwards
        torch.default_generator.manual_seed(child)  # the CPU's only: torch.manual_seed would reseed every GPU's
        return transform(img)


def sample_seed(seed: int, epoch: int, index: int, draw: int = 0) -> int:
    """A well-mixed 63-bit seed for one draw of one sample in one epoch (splitmix64 finaliser);
    ``draw=0`` gives the seed of a sample drawn once (the same as before draws existed)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB
         + draw * 0xD6E8FEB86659FD93) % (1 << 64)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) % (1 << 64)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return x & ((1 << 63) - 1)


@dataclass(frozen=True)
class ImageTransform:
    """Geometry + augmentation for one split. Callable on (uint8 image, generator or None)."""

    size: int
    augment: tuple[str, ...] = ()
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    resize: int | None = None  # the deterministic geometry's shorter side before the centre crop (None: size)
    interpolation: str = "bilinear"
    erasing_p: float = 0.1  # random_erasing: the chance per image
    erase_value: tuple[int, int, int] = (124, 116, 104)  # the data mean as uint8: erased areas normalise to 0

    @property
    def random(self) -> bool:
        return bool(self.augment)

    @property
    def crops_randomly(self) -> bool:
        return "random_resized_crop" in self.augment

    def __call__(self, img: torch.Tensor, gen: torch.Generator | None, cropped: bool = False) -> torch.Tensor:
        """``cropped``: ``img`` is already this sample's random resized crop (made while decoding,
        with :meth:`crop_box` drawn from ``gen``); the rest of the augmentation follows."""
        if cropped:
            pass
        elif self.crops_randomly and gen is not None:
            top, left, h, w = self.crop_box(img.shape[-2], img.shape[-1], gen)
            img = F.resized_crop(img, top, left, h, w, [self.size, self.size], interpolation=self._mode,
                                 antialias=True)
        else:
            img = self._fit(img)
        if "flip" in self.augment and gen is not None:
            if torch.rand(1, generator=gen).item() < 0.5:
                img = F.horizontal_flip(img)
        if gen is not None and self._policy is not None:
            img = _seeded(self._policy, img, gen)
        if gen is not None and self._timm_policy is not None:
            img = seeded_timm(self._timm_policy, img, gen)
        if gen is not None and "random_erasing" in self.augment:
            img = _seeded(self._erasing, img, gen)
        return img

    @functools.cached_property
    def _policy(self) -> Any:
        """The torchvision.transforms.v2 policy named in ``augment`` (on uint8 tensors), or None."""
        # the policies' rotations and shears on tensors support nearest and bilinear only (as torchvision's
        # recipe, bilinear; bicubic applies to the resizes)
        mode = F.InterpolationMode.BILINEAR
        for name, build in (("trivialaugment", lambda: v2.TrivialAugmentWide(interpolation=mode)),
                            ("randaugment", lambda: v2.RandAugment(interpolation=mode)),
                            ("autoaugment", lambda: v2.AutoAugment(interpolation=mode))):
            if name in self.augment:
                return build()
        return None

    @functools.cached_property
    def _timm_policy(self) -> Any:
        """timm's transform for a timm augmentation string in ``augment`` (rand-..., augmix-...), or None."""
        name = next((a for a in self.augment if is_timm_augment(a)), None)
        return None if name is None else timm_augment(name, self.size, self.erase_value, self.interpolation)

    @functools.cached_property
    def _erasing(self) -> Any:
        return v2.RandomErasing(p=self.erasing_p, value=list(self.erase_value))

    def fit(self, img: torch.Tensor) -> torch.Tensor:
        """The deterministic geometry (what the decoded cache stores)."""
        return self._fit(img)

    @property
    def _mode(self) -> F.InterpolationMode:
        return F.InterpolationMode(self.interpolation)

    def _fit(self, img: torch.Tensor) -> torch.Tensor:
        """Resize the shorter side to ``resize`` (default ``size``) and centre-crop a ``size`` square;
        a no-op on an image that is already ``size`` square when ``resize`` is ``size``. With
        ``resize = int(size / crop_pct)`` this is torchvision's ``Resize(resize)`` + ``CenterCrop(size)``."""
        h, w = img.shape[-2:]
        target = self.resize or self.size
        if (h, w) != (self.size, self.size) or target != self.size:
            img = F.resize(img, [target], interpolation=self._mode, antialias=True)
            img = F.center_crop(img, [self.size, self.size])
        return img

    @property
    def mode(self) -> F.InterpolationMode:
        """The resizes' interpolation."""
        return self._mode

    def crop_box(self, height: int, width: int, gen: torch.Generator) -> tuple[int, int, int, int]:
        """RandomResizedCrop's box ``(top, left, h, w)`` of a ``height x width`` picture, drawn from
        ``gen`` (torchvision's rule: 10 tries of area and log-ratio, then the centre square)."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            u = torch.rand(3, generator=gen, dtype=torch.float64).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
                left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
                return top, left, h, w
        side = min(height, width)  # fallback: centre crop
        return (height - side) // 2, (width - side) // 2, side, side


class Normalize(torch.nn.Module):
    """uint8 [B,3,H,W] batch -> normalised float, on whatever device the batch is on (channels-last
    in memory with ``channels_last``)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False) -> None:
        super().__init__()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mul_(self.scale).sub_(self.shift).contiguous(memory_format=self.memory_format)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of :class:`Normalize`, to [0, 1] floats (for pictures)."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x * s + m).clamp(0, 1)
