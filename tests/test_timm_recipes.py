"""configs/recipes/timm_rsb_a2.yaml and timm_rsb_a3.yaml: timm's model, LAMB, BCE, stochastic depth and
RandAugment string as the paper's columns A2 and A3 set them, loaded and run for a debug pass (skips
where timm is missing: the recipes name timm's model, optimizer and augmentation)."""
import pytest
import torchvision.models  # noqa: F401  (timm imports it, which sets TORCHINDUCTOR_CACHE_DIR: done here, before the tests' process-state check)
from conftest import PY, ROOT, child_env, run

from ddp_trainer import config


def _debug_pass(path, demo_small, tmp_path) -> None:
    res = run([PY, str(ROOT / "launch.py"), "--debug", "--config", str(path), f"data.root={demo_small}",
               f"output_dir={tmp_path / 'run'}", "data.image_size=32", "data.train_image_size=24",
               "data.batch_size=4", "train.precision=fp32", "debug.epochs=1", "debug.steps_per_epoch=2"],
              env=child_env(), timeout=600)
    assert res.returncode == 0, res.stderr
    assert "done: val_loss=" in res.stderr


def test_the_rsb_a2_recipe_loads_with_timm_s_keys_and_runs_a_debug_pass(demo_small, tmp_path):
    pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[timm]')")
    path = ROOT / "configs" / "recipes" / "timm_rsb_a2.yaml"
    cfg = config.load(str(path), [])
    assert (cfg.model.name, cfg.model.drop_path_rate, cfg.optim.name, cfg.train.loss) == (
        "timm/resnet50", 0.05, "lamb", "bce")
    assert (cfg.train.epochs, cfg.data.image_size, cfg.data.val_crop_pct, cfg.train.ema_decay) == (300, 224, 0.95, None)
    assert (cfg.data.sampler, cfg.data.ra_repeats, cfg.data.mixup_alpha, cfg.data.cutmix_alpha) == (
        "repeated_augment", 3, 0.1, 1.0)
    assert cfg.data.augment == ["random_resized_crop", "flip", "rand-m7-mstd0.5-inc1"]
    assert cfg.optim.lr * 2048 / 256 == pytest.approx(5e-3) and cfg.optim.weight_decay == 0.02
    assert cfg.train.label_smoothing == 0.0 and cfg.taken_from_model == ()  # from scratch
    text = path.read_text()
    assert "stands in" not in text and "no key for" not in text  # the header names no missing key
    _debug_pass(path, demo_small, tmp_path)


def test_the_rsb_a3_recipe_loads_with_timm_s_keys_and_runs_a_debug_pass(demo_small, tmp_path):
    pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[timm]')")
    path = ROOT / "configs" / "recipes" / "timm_rsb_a3.yaml"
    cfg = config.load(str(path), [])
    assert (cfg.model.name, cfg.optim.name, cfg.train.loss, cfg.train.bce_target_threshold) == (
        "timm/resnet50", "lamb", "bce", 0.2)
    assert (cfg.train.epochs, cfg.data.train_image_size, cfg.data.image_size, cfg.data.val_crop_pct) == (
        100, 160, 224, 0.95)
    assert cfg.data.augment == ["random_resized_crop", "flip", "rand-m6-mstd0.5-inc1"]
    assert cfg.optim.lr * 2048 / 256 == pytest.approx(8e-3) and cfg.taken_from_model == ()  # from scratch
    _debug_pass(path, demo_small, tmp_path)
