"""timm models of one input size (ViT, Swin): a data size they cannot take is refused before the run,
and a pretrained file of another image size (its position embedding of another grid) is refused
saying how to resample it with timm, a command this test runs (skips where timm is missing)."""
import re
import subprocess

import pytest
import torch
import torchvision.models  # noqa: F401  (timm imports it, which sets TORCHINDUCTOR_CACHE_DIR: done here, before the tests' process-state check)
from conftest import PY, ROOT, child_env, run

from ddp_trainer.checkpoint.reader import read_checkpoint
from ddp_trainer.errors import ConfigError
from ddp_trainer.models import build_model, check_input_size
from ddp_trainer.training.resume import apply_initial_weights

VIT = "vit_tiny_patch16_224"
NO_TIMM = "timm is not installed (pip install -e '.[timm]')"


def test_a_size_a_vit_cannot_take_is_refused_naming_the_key_and_its_size(demo_small, tmp_path):
    pytest.importorskip("timm", reason=NO_TIMM)
    check_input_size(f"timm/{VIT}", {"data.image_size": 224})
    check_input_size("timm/test_resnet", {"data.image_size": 37})  # a CNN takes any size
    with pytest.raises(ConfigError, match=r"data.train_image_size=160: timm/swin_tiny_patch4_window7_224 takes "
                                          r"224x224 inputs only .*set data.train_image_size=224"):
        check_input_size("timm/swin_tiny_patch4_window7_224", {"data.train_image_size": 160, "data.image_size": 224})
    res = run([PY, str(ROOT / "launch.py"), f"data.root={demo_small}", f"output_dir={tmp_path / 'run'}",
               f"model.name=timm/{VIT}", "data.image_size=32"], env=child_env())
    assert res.returncode == 2, res.stderr
    assert f"data.image_size=32: timm/{VIT} takes 224x224 inputs only" in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_vit_file_of_another_image_size_is_refused_and_timm_s_resampling_command_fixes_it(demo_small, tmp_path):
    timm = pytest.importorskip("timm", reason=NO_TIMM)
    torch.manual_seed(0)
    small = timm.create_model(VIT, img_size=64)  # trained at 64 px: a 4x4 grid of patches
    path = tmp_path / "vit_64.pth"
    torch.save(small.state_dict(), path)
    res = run([PY, str(ROOT / "launch.py"), "--debug", f"data.root={demo_small}", f"output_dir={tmp_path / 'run'}",
               f"model.name=timm/{VIT}", f"model.weights={path}", "data.image_size=224", "debug.epochs=1"],
              env=child_env())
    assert res.returncode == 2, res.stderr
    line = next(l for l in res.stderr.splitlines() if "pos_embed is" in l)
    assert f"pos_embed is (1, 17, 192) in the file and (1, 197, 192) in timm/{VIT}" in line
    assert not list((tmp_path / "run").rglob("*.pt"))

    # the command the line gives, on this file, writes one that loads (the head left new for 3 classes)
    command = re.search(r'python -c "(.*?)"\)', line).group(1).replace("FILE", str(path))
    fixed = subprocess.run([PY, "-c", command], cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                           timeout=300)
    assert fixed.returncode == 0, fixed.stderr
    resampled = read_checkpoint(tmp_path / "resampled.pth")
    model = build_model(f"timm/{VIT}", 3)
    apply_initial_weights(model, resampled, f"timm/{VIT}")
    want = timm.layers.resample_abs_pos_embed(small.pos_embed.detach(), (14, 14), num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed.detach(), want, atol=1e-6)
    assert torch.equal(model.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
