"""configs/recipes/timm_rsb_a3.yaml: timm's model, LAMB, BCE and RandAugment string as the paper's column A3 sets them,
loaded and run for a debug pass (skips where timm is missing)."""
import pytest
import torchvision.models  # noqa: F401  (timm imports it, which sets TORCHINDUCTOR_CACHE_DIR: done here, before the tests' process-state check)
from conftest import PY, ROOT, child_env, run

from ddp_trainer import config


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
    res = run([PY, str(ROOT / "launch.py"), "--debug", "--config", str(path), f"data.root={demo_small}",
               f"output_dir={tmp_path / 'run'}", "data.image_size=32", "data.train_image_size=24",
               "data.batch_size=4", "train.precision=fp32", "debug.epochs=1", "debug.steps_per_epoch=2"],
              env=child_env(), timeout=600)
    assert res.returncode == 0, res.stderr
    assert "done: val_loss=" in res.stderr
