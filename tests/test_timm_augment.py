"""timm's augmentation strings as ``data.augment`` entries: the pixels timm's own transform (as its
``create_transform`` builds it) makes for the same random state, drawn from (seed, epoch, sample)
so that order, workers and resume change nothing (skips where timm is missing)."""
import random

import numpy as np
import pytest
import torch
import torchvision.models  # noqa: F401  (timm imports it, which sets TORCHINDUCTOR_CACHE_DIR: done here, before the tests' process-state check)
from conftest import launch
from torchvision.transforms.v2 import functional as F

from ddp_trainer import config as config_mod
from ddp_trainer.data.datasets import train_transform
from ddp_trainer.errors import ConfigError


def _timm():
    return pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[timm]')")


def _image(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name", ["rand-m7-mstd0.5-inc1", "rand-m9-n3", "augmix-m5-w4-d2"])
def test_a_timm_string_makes_the_pixels_timm_s_create_transform_makes_from_the_same_random_state(name):
    timm = _timm()
    cfg = config_mod.load(None, [f"data.augment=[{name}]", "data.image_size=32"]).data
    ours = train_transform(cfg)
    # timm's own training pipeline at this size and mean: its auto-augment stage, as --aa builds it
    pipeline = timm.data.create_transform(32, is_training=True, auto_augment=name, interpolation="bilinear",
                                          mean=tuple(cfg.mean), std=tuple(cfg.std))
    theirs = next(t for t in pipeline.transforms if type(t).__name__ in ("RandAugment", "AugMixAugment"))
    for sample in range(4):
        img = _image(sample)
        got = ours(img, torch.Generator().manual_seed(sample))
        child = int(torch.randint(0, 2 ** 32, (1,), generator=torch.Generator().manual_seed(sample)))
        random.seed(child)
        np.random.seed(child)
        want = F.pil_to_tensor(theirs(F.to_pil_image(ours.fit(img))))
        assert torch.equal(got, want), (name, sample)


def test_the_draws_depend_on_the_sample_only_and_leave_the_global_generators_as_they_were():
    _timm()
    t = train_transform(config_mod.load(None, ["data.augment=[flip,rand-m9-mstd0.5-inc1]", "data.image_size=32"]).data)
    seeds = list(range(6))
    first = [t(_image(s), torch.Generator().manual_seed(s)) for s in seeds]
    random.seed(5)
    np.random.seed(5)
    before = (random.getstate(), np.random.get_state()[1].copy())
    again = [t(_image(s), torch.Generator().manual_seed(s)) for s in reversed(seeds)][::-1]  # another order
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert any(not torch.equal(first[0], x) for x in first[1:])


def test_timm_strings_are_checked():
    with pytest.raises(ConfigError, match=r"^data.augment: bad value .*at most one of .*timm's strings"):
        config_mod.load(None, ["data.augment=[randaugment,rand-m9-n2]"])
    with pytest.raises(ConfigError, match=r"unknown augmentation 'rand_m9'; .*a timm string"):
        config_mod.load(None, ["data.augment=[rand_m9]"])


def test_two_processes_train_with_a_timm_randaugment_string(small_args):
    _timm()
    res = launch(2, *small_args, "data.augment=[flip,rand-m7-mstd0.5-inc1]", "train.epochs=1")
    assert res.returncode == 0, res.stderr


def test_posterize_at_the_top_magnitude_keeps_no_bits_where_pillow_refuses_zero():
    """timm's PosterizeIncreasing at magnitude 10 keeps 0 bits, which Pillow 11+ refuses (a crash at
    a random sample of rand-m9-mstd0.5-inc1): here it is the black image older Pillow made, and every
    other bit count is timm's own pixels."""
    timm = _timm()
    t = train_transform(config_mod.load(None, ["data.augment=[rand-m9-mstd0.5-inc1]", "data.image_size=32"]).data)
    op = next(o for o in t._timm_policy.ops if o.name == "PosterizeIncreasing")
    pil = F.to_pil_image(_image(0))
    op.prob, op.magnitude_std = 1.0, 0.0
    op.magnitude = 10.0  # 4 - int(10 / 10 * 4) = 0 bits
    assert torch.equal(F.pil_to_tensor(op(pil)), torch.zeros(3, 32, 32, dtype=torch.uint8))
    for m in (0.0, 3.0, 6.0, 9.0):  # 4, 3, 2, 1 bits
        op.magnitude = m
        bits = 4 - int(m / 10 * 4)
        want = F.pil_to_tensor(timm.data.auto_augment.posterize(pil, bits))
        assert torch.equal(F.pil_to_tensor(op(pil)), want), m
    # the string whose draws reach magnitude 10 (m9, std 0.5), freshly built: many samples, none raises
    fresh = train_transform(config_mod.load(None, ["data.augment=[rand-m9-mstd0.5-inc1]", "data.image_size=32"]).data)
    for s in range(300):
        fresh(_image(s), torch.Generator().manual_seed(s))
