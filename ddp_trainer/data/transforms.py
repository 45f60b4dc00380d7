"""Image decoding and augmentation with per-sample, reproducible randomness.

Each sample's random choices come from a generator seeded by ``(seed, epoch, sample index)``, never
from a global random stream: the result does not depend on which loader worker handles the sample
or on how many samples were skipped on resume. Transforms work on uint8 tensors; conversion to
float and normalisation happen on the training device (:class:`Normalize`).
"""
from __future__ import annotations

import functools
import io
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile
from torchvision.transforms.v2 import functional as F

from ..errors import DataError, show_path

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image
# torchvision 0.29 marks its decoders deprecated in favour of torchcodec; they are still the fast path here
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def _seeded(transform: Any, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Run a torchvision transform (which draws from torch's global generator) on numbers drawn from
    the sample's own generator: the result depends on (seed, epoch, sample) only, never on the
    worker, the order, or what ran before; the global generator is left as it was."""
    child = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(child)
        return transform(img)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (splitmix64 finaliser)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) % (1 << 64)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return x & ((1 << 63) - 1)


_TORCHVISION_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")


def _decode_with_torchvision(data: bytes) -> bool:
    return data.startswith(_TORCHVISION_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _bad(path: str, why: str) -> DataError:
    return DataError(f"cannot decode image '{show_path(path)}' ({why}); replace or delete the file, "
                     f"or set data.bad_images=skip")


def read_regular_file(path: str) -> bytes:
    """The bytes of ``path``; DataError naming it when it cannot be read or is not a regular file.

    Opened non-blocking and checked before reading: a FIFO, socket or device named like an image
    would otherwise block the read forever (or never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _bad(path, exc.strerror or str(exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
            raise DataError(f"'{show_path(path)}' is not a regular file ({kind}); only image files belong in "
                            f"the class folders: remove it, or set data.bad_images=skip")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            return f.read()
    except OSError as exc:
        raise _bad(path, exc.strerror or str(exc)) from None
    finally:
        if fd >= 0:
            os.close(fd)


def load_rgb(path: str) -> torch.Tensor:
    """Decode ``path`` to a uint8 CHW RGB tensor (grayscale, palette, RGBA and CMYK converted).

    JPEG, PNG, GIF and WebP are decoded by torchvision.io (libjpeg-turbo / libpng: faster than PIL,
    and strict about truncated files); other formats by PIL. Raises DataError naming the file when it
    cannot be decoded (corrupt or truncated).
    """
    data = read_regular_file(path)
    if _decode_with_torchvision(data):
        from torchvision.io import ImageReadMode, decode_image

        try:
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as exc:
            why = re.sub(r"^.*?\.cpp:\d+,\s*", "", str(exc).strip().splitlines()[-1])  # drop the C++ location
            raise _bad(path, why[:160]) from None
        if img.ndim == 4:  # an animated GIF: its first frame
            img = img[0]
        if img.dtype != torch.uint8:  # a 16-bit PNG: scale to 8 bits as PIL does (not the low byte)
            img = F.to_dtype(img, torch.uint8, scale=True)
        return img.contiguous()
    try:
        with Image.open(io.BytesIO(data)) as pil:
            pil.load()
            rgb = pil.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # PIL names the in-memory buffer it was given; the file is named by _bad already
        raise _bad(path, re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))) from None
    arr = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


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

    def __call__(self, img: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        if "random_resized_crop" in self.augment and gen is not None:
            top, left, h, w = self._crop_params(img, gen)
            img = F.resized_crop(img, top, left, h, w, [self.size, self.size], interpolation=self._mode,
                                 antialias=True)
        else:
            img = self._fit(img)
        if "flip" in self.augment and gen is not None:
            if torch.rand(1, generator=gen).item() < 0.5:
                img = F.horizontal_flip(img)
        if gen is not None and self._policy is not None:
            img = _seeded(self._policy, img, gen)
        if gen is not None and "random_erasing" in self.augment:
            img = _seeded(self._erasing, img, gen)
        return img

    @functools.cached_property
    def _policy(self) -> Any:
        """The torchvision.transforms.v2 policy named in ``augment`` (on uint8 tensors), or None."""
        from torchvision.transforms import v2

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
    def _erasing(self) -> Any:
        from torchvision.transforms import v2

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

    def _crop_params(self, img: torch.Tensor, gen: torch.Generator) -> tuple[int, int, int, int]:
        height, width = img.shape[-2:]
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
    """uint8 [B,3,H,W] batch -> normalised float, on whatever device the batch is on."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mul_(self.scale).sub_(self.shift)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of :class:`Normalize`, to [0, 1] floats (for pictures)."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x * s + m).clamp(0, 1)
