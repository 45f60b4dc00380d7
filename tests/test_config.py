"""Config: defaults == configs/default.yaml, YAML + dotted overrides, typed validation with hints."""
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, launch, our_lines

from ddp_trainer import config
from ddp_trainer.errors import ConfigError


def test_builtin_defaults_equal_default_yaml():
    file_values = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert config.from_dict(file_values) == config.Config()
    assert config.from_dict(file_values).to_dict() == file_values  # every key is spelled out in the file


def test_overrides_are_parsed_as_yaml():
    cfg = config.load(None, ["train.epochs=7", "optim.lr=3e-4", "data.classes=[cat,dog]",
                             "data.augment=none", "model.init_from=null", "output_dir=/x/y"])
    assert cfg.train.epochs == 7
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.classes == ["cat", "dog"]
    assert cfg.data.augment == []
    assert cfg.model.init_from is None
    assert cfg.output_dir == "/x/y"
    assert config.load(None, ["log.progress=off"]).log.progress == "off"  # YAML reads off as false
    assert config.load(None, ["log.progress=on"]).log.progress == "on"


def test_precedence_defaults_file_cli(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 3\ndata:\n  batch_size: 16\n")
    cfg = config.load(f, ["train.epochs=4"])
    assert (cfg.train.epochs, cfg.data.batch_size, cfg.data.image_size) == (4, 16, config.DataConfig().image_size)


@pytest.mark.parametrize("override, words", [
    (["train.epoch=3"], ["train.epoch", "train.epochs"]),
    (["data.batchsize=3"], ["data.batchsize", "data.batch_size"]),
    (["optim.name=adam"], ["optim.name", "adamw"]),
    (["train.epochs=0"], ["train.epochs", "at least 1"]),
    (["train.epochs=two"], ["train.epochs", "whole number"]),
    (["data.augment=[flip,rotate]"], ["data.augment", "rotate"]),
    (["data.bad_images=ignore"], ["data.bad_images", "error", "skip"]),
    (["data.val_fraction=1.5"], ["data.val_fraction"]),
    (["dist.timeout_s=-1"], ["dist.timeout_s"]),
    (["noequals"], ["key=value"]),
])
def test_bad_values_name_the_key_and_fix(override, words):
    with pytest.raises(ConfigError) as info:
        config.load(None, override)
    msg = info.value.message
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_config_file_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        config.load(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("trian:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"typo.yaml.*'trian'.*'train"):
        config.load(typo)


def test_dump_round_trips():
    cfg = config.load(None, ["train.epochs=9", "data.classes=[a,b]"])
    assert config.from_dict(yaml.safe_load(config.dump(cfg))) == cfg


def test_cli_bad_key_is_one_line_exit_2_before_any_process_group(tmp_path: Path):
    # under torchrun with 2 ranks: printed once, no traceback, exit code 2 from the workers
    res = launch(2, "train.epohcs=3", f"output_dir={tmp_path}/r", timeout=120)
    assert res.returncode != 0
    lines = [l for l in our_lines(res.stderr) if "error:" in l]
    assert len(lines) == 1, res.stderr
    assert "train.epohcs" in lines[0] and "train.epochs" in lines[0]
    assert str(ROOT / "ddp_trainer") not in res.stderr  # no traceback through our code (torchrun's own aside)
    assert "launch:" not in res.stderr  # rejected before the process group
    single = launch(0, "train.epohcs=3", f"output_dir={tmp_path}/r", timeout=60)
    assert single.returncode == 2
    assert single.stderr.strip().splitlines() == [lines[0].split("] ", 1)[-1]]
    assert not (tmp_path / "r").exists()


def test_unknown_model_name_gets_the_closest_one():
    from ddp_trainer.models import check_model_name

    with pytest.raises(ConfigError, match="'resnet81'; did you mean 'resnet18'"):
        check_model_name("resnet81")
    check_model_name("tiny_cnn")
    check_model_name("resnet50")
    check_model_name("mypkg.models:build")  # checked when imported


def test_every_key_is_in_the_readmes_configuration_table():
    from ddp_trainer.config import valid_keys

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration"): readme.index("## Data")]
    missing = [k for k in valid_keys() if f"`{k}`" not in table]
    assert not missing, missing
