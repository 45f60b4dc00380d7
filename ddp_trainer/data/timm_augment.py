"""timm's augmentation strings as ``data.augment`` entries (``rand-m7-mstd0.5-inc1``,
``augmix-m5-w4-d2``): timm's own RandAugment / AugMix, built as timm's ``create_transform`` builds
them, on each sample's own random numbers.

timm's operations draw from Python's ``random`` and NumPy's global generator and work on PIL images;
:func:`seeded_timm` seeds both from the sample's generator (so a result depends on (seed, epoch,
sample) only, as every augmentation here) and puts both generators back afterwards.

timm's posterize at the top magnitude keeps 0 bits, which Pillow 11 and later refuse (ValueError:
a training crash at a random sample); :func:`_posterize` gives the black image older Pillow made
(and timm means: "keep 4 down to 0 MSB") and replaces timm's function in the built transform only.
"""
from __future__ import annotations

import functools
import random
from typing import Any, Callable

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from ..errors import ConfigError
from ..extras import optional

PREFIXES = ("rand-", "augmix-")  # what timm's create_transform tells apart by the string's start


def is_timm_augment(name: str) -> bool:
    return name.startswith(PREFIXES)


def timm_augment(name: str, size: int, mean_uint8: tuple[int, int, int], interpolation: str) -> Callable[[Any], Any]:
    """timm's transform for ``name`` with the hparams ``transforms_imagenet_train`` gives it
    (translate_const 0.45 x the side, the data mean as fill, the run's interpolation; AugMix's
    translate_pct 0.3). ConfigError naming the entry when timm cannot parse it."""
    aa = optional("timm.data.auto_augment", f"data.augment {name}", "timm")
    pil = optional("timm.data.transforms", f"data.augment {name}", "timm")
    hparams: dict[str, Any] = {"translate_const": int(size * 0.45), "img_mean": tuple(mean_uint8),
                               "interpolation": pil.str_to_pil_interp(interpolation)}
    try:
        if name.startswith("augmix-"):
            hparams["translate_pct"] = 0.3
            built = aa.augment_and_mix_transform(name, hparams)
        else:
            built = aa.rand_augment_transform(name, hparams)
    except (AssertionError, ValueError, KeyError, IndexError) as exc:
        raise ConfigError(f"data.augment: timm cannot read {name!r} ({type(exc).__name__}: {exc}); write it as "
                          f"timm's --aa does, e.g. rand-m9-mstd0.5-inc1 or augmix-m5-w4-d2") from None
    for op in getattr(built, "ops", ()):
        if op.aug_fn is aa.posterize:
            op.aug_fn = functools.partial(_posterize, aa.posterize)
    return built


def _posterize(timm_posterize: Callable[..., Any], img: Any, bits_to_keep: int, **kwargs: Any) -> Any:
    """``timm_posterize``, with 0 bits kept giving a black image (what Pillow did before it refused 0)."""
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return timm_posterize(img, bits_to_keep, **kwargs)


def seeded_timm(transform: Callable[[Any], Any], img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``transform`` (a timm PIL transform) on the uint8 tensor ``img``, with Python's and NumPy's
    generators seeded from ``gen`` and restored afterwards."""
    child = int(torch.randint(0, 2 ** 32, (1,), generator=gen))
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        random.seed(child)
        np.random.seed(child)
        return F.pil_to_tensor(transform(F.to_pil_image(img)))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
