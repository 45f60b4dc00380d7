"""timm's models by name (``model.name=timm/NAME``) and the drop-rate keys, against the real timm
package (each test skips with a reason where timm is not installed)."""
import os

import pytest
import torch
from conftest import child_env, launch

from ddp_trainer import config as config_mod
from ddp_trainer.errors import ConfigError
from ddp_trainer.models import build_model, check_model_name, classifier_head

TINY = "test_resnet.r160_in1k"  # timm's own test net: a few thousand parameters, tagged weights


def _timm():
    return pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[timm]')")


def test_timm_name_builds_what_timm_create_model_builds_with_the_drop_rates():
    timm = _timm()
    model = build_model(f"timm/{TINY}", 5, drop_rate=0.25, drop_path_rate=0.1)
    ref = timm.create_model(TINY, pretrained=False, num_classes=5, drop_rate=0.25, drop_path_rate=0.1)
    assert type(model) is type(ref) and model.num_classes == 5 and model.drop_rate == 0.25
    assert list(model.state_dict()) == list(ref.state_dict())
    paths = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert paths and max(paths) == pytest.approx(0.1)  # stochastic depth reached the blocks
    assert classifier_head(model) == ["fc."]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_unknown_timm_names_get_the_closest_and_unknown_tags_the_model_s_tags():
    _timm()
    with pytest.raises(ConfigError, match=r"timm has no model 'resnet51'; did you mean .*timm/resnet50"):
        check_model_name("timm/resnet51")
    with pytest.raises(ConfigError, match=r"no weights tag 'zzz' for resnet18; choose one of timm/resnet18\."):
        check_model_name("timm/resnet18.zzz")
    check_model_name("timm/resnet50.a1_in1k")


def test_drop_rates_reach_torchvision_builders_that_have_them_and_are_refused_naming_the_model():
    convnext = build_model("convnext_tiny", 3, drop_path_rate=0.3)
    assert max(m.p for m in convnext.modules() if type(m).__name__ == "StochasticDepth") == pytest.approx(0.3)
    assert build_model("efficientnet_b0", 3, drop_rate=0.4).classifier[0].p == 0.4
    # 0 keeps the builder's own default: a config without the keys builds what it built before
    assert max(m.p for m in build_model("convnext_tiny", 3).modules()
               if type(m).__name__ == "StochasticDepth") == pytest.approx(0.1)
    for name, kw, key in (("resnet18", {"drop_path_rate": 0.1}, "model.drop_path_rate"),
                          ("resnet18", {"drop_rate": 0.1}, "model.drop_rate"),
                          ("tiny_cnn", {"drop_rate": 0.1}, "model.drop_rate")):
        with pytest.raises(ConfigError, match=rf"^{key}=0.1: .*{name}.* no .*setting; remove {key}"):
            check_model_name(name, **kw)  # on the meta device: no weights allocated
    with pytest.raises(ConfigError, match=r"^model.drop_path_rate=0.1: timm's vgg11 has no drop_path_rate"):
        check_model_name("timm/vgg11", drop_path_rate=0.1)


@pytest.mark.parametrize("key", ["model.drop_rate", "model.drop_path_rate"])
@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_drop_rates_outside_0_to_1_are_refused_by_the_config(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: bad value {value!r}; use a probability in \[0, 1\)"):
        config_mod.load(None, [f"{key}={value}"])


def test_without_timm_a_timm_name_is_one_line_with_the_install_command(tmp_path, small_args):
    blocker = tmp_path / "no_timm"
    blocker.mkdir()
    (blocker / "timm.py").write_text("raise ImportError('blocked by the test')\n")
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), env["PYTHONPATH"]])
    res = launch(0, *small_args, "model.name=timm/resnet18", env=env, cold=True)
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.splitlines() if "timm" in l]
    assert len(lines) == 1 and "model.name=timm/resnet18 needs timm, which is not installed" in lines[0]
    assert "pip install -e '.[timm]'" in lines[0] and "Traceback" not in res.stderr
