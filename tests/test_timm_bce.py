"""``train.loss=bce``: per-sample losses that add up to what timm's ``BinaryCrossEntropy`` computes,
with smoothing, the target threshold and MixUp/CutMix's soft targets (skips where timm is missing)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.models  # noqa: F401  (timm imports it, which sets TORCHINDUCTOR_CACHE_DIR: done here, before the tests' process-state check)
from conftest import launch, metrics

from ddp_trainer import config as config_mod
from ddp_trainer.errors import ConfigError
from ddp_trainer.training.losses import binary_cross_entropy, training_loss


def _timm_loss():
    return pytest.importorskip("timm.loss", reason="timm is not installed (pip install -e '.[timm]')")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("threshold", [None, 0.2])
def test_bce_on_labels_equals_timm_s_binary_cross_entropy(smoothing, threshold):
    timm_loss = _timm_loss()
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    ours = binary_cross_entropy(smoothing, threshold)(logits, labels)
    assert ours.shape == (8,)  # per sample: the engine weights each by 1/B
    theirs = timm_loss.BinaryCrossEntropy(smoothing=smoothing, target_threshold=threshold)(logits, labels)
    torch.testing.assert_close((ours / 8).sum(), theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("threshold", [None, 0.2])
def test_bce_on_mixed_targets_equals_timm_s_mixup_targets_and_loss(threshold):
    timm_loss = _timm_loss()
    from timm.data.mixup import mixup_target

    torch.manual_seed(1)
    logits, labels, lam, s = torch.randn(6, 4), torch.randint(0, 4, (6,)), 0.7, 0.1
    one_hot = F.one_hot(labels, 4).float()
    mixed = lam * one_hot + (1 - lam) * one_hot.flip(0)  # what torchvision's MixUp/CutMix hand the loss here
    ours = binary_cross_entropy(s, threshold)(logits, mixed)
    theirs_targets = mixup_target(labels, 4, lam=lam, smoothing=s)  # timm's Mixup smooths before mixing
    theirs = timm_loss.BinaryCrossEntropy(smoothing=s, target_threshold=threshold)(logits, theirs_targets)
    torch.testing.assert_close((ours / 6).mean() * 6, theirs, rtol=1e-6, atol=1e-7)


def test_bce_keys_are_validated_and_reach_the_loss():
    cfg = config_mod.load(None, ["train.loss=bce", "train.bce_target_threshold=0.2", "train.label_smoothing=0.1"])
    logits, labels = torch.randn(3, 4), torch.tensor([0, 1, 2])
    assert torch.equal(training_loss(cfg.train)(logits, labels), binary_cross_entropy(0.1, 0.2)(logits, labels))
    with pytest.raises(ConfigError, match=r"^train.bce_target_threshold: bad value 0.2; set train.loss=bce"):
        config_mod.load(None, ["train.bce_target_threshold=0.2"])
    with pytest.raises(ConfigError, match=r"^train.bce_target_threshold: bad value 1.5; use a number in \[0, 1\)"):
        config_mod.load(None, ["train.loss=bce", "train.bce_target_threshold=1.5"])


def test_two_processes_train_with_bce_and_cutmix(small_args):
    out = next(a for a in small_args if a.startswith("output_dir=")).split("=", 1)[1]
    res = launch(2, *small_args, "train.loss=bce", "train.bce_target_threshold=0.2", "data.cutmix_alpha=1.0",
                 "train.label_smoothing=0.1")
    assert res.returncode == 0, res.stderr
    rows = metrics(Path(out))
    assert len(rows) == 2 and all(0 < r["train_loss"] < 1 for r in rows)  # a BCE figure, not cross-entropy's
