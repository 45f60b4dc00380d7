"""timm's pretrained weights from local files only (``model.weights`` with ``model.name=timm/NAME``):
the Hugging Face hub cache as the hub lays it out, a ``local-dir:`` folder, a file; the head replaced
for the data's classes; never a download. The files are made here with timm and safetensors."""
from pathlib import Path

import pytest
import torch
from conftest import PY, child_env, launch, run

from ddp_trainer import pretrained
from ddp_trainer.checkpoint.reader import read_checkpoint
from ddp_trainer.errors import ConfigError
from ddp_trainer.models import build_model
from ddp_trainer.models.timm_weights import hub_cache
from ddp_trainer.training.resume import apply_initial_weights

TINY = "test_resnet.r160_in1k"
REV = "0123456789abcdef0123456789abcdef01234567"


def _timm_and_safetensors():
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[timm]')")
    st = pytest.importorskip("safetensors.torch", reason="safetensors is not installed (comes with timm)")
    return timm, st


def _pretrained_sd(timm, seed: int) -> dict[str, torch.Tensor]:
    """A 1000-class test_resnet's weights, as the hub's file would hold them."""
    torch.manual_seed(seed)
    return timm.create_model(TINY, pretrained=False).state_dict()


def _hub_home(tmp_path: Path, timm, st) -> tuple[Path, dict[str, torch.Tensor]]:
    """An HF_HOME whose hub cache holds timm/TINY as huggingface_hub writes it: the file as a blob,
    linked from snapshots/<rev>/, refs/main naming <rev>; plus an older snapshot refs/main does not name."""
    repo = tmp_path / "hf" / "hub" / f"models--timm--{TINY}"
    sd = _pretrained_sd(timm, 1)
    for rev, weights in ((REV, sd), ("f" * 40, _pretrained_sd(timm, 2))):
        blob = repo / "blobs" / f"blob-{rev[:8]}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        st.save_file({k: v.contiguous() for k, v in weights.items()}, str(blob))
        (repo / "snapshots" / rev).mkdir(parents=True)
        (repo / "snapshots" / rev / "model.safetensors").symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return tmp_path / "hf", sd


def _assert_backbone_from(model, sd, num_classes):
    mine = model.state_dict()
    assert mine["fc.weight"].shape == (num_classes, sd["fc.weight"].shape[1])  # the head is new
    assert all(torch.equal(mine[k], v) for k, v in sd.items() if not k.startswith("fc."))


def test_hub_cache_snapshot_that_refs_main_names_is_found_read_and_fitted_with_a_new_head(tmp_path, monkeypatch):
    timm, st = _timm_and_safetensors()
    home, sd = _hub_home(tmp_path, timm, st)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert hub_cache() == home / "hub"
    found = pretrained.require(f"timm/{TINY}", "DEFAULT")
    assert found.path == home / "hub" / f"models--timm--{TINY}" / "snapshots" / REV / "model.safetensors"
    assert found.weights == f"timm/{TINY} (hub cache)"
    model = build_model(f"timm/{TINY}", 3)
    apply_initial_weights(model, read_checkpoint(found.path))
    _assert_backbone_from(model, sd, 3)


def test_local_dir_and_a_pth_file_are_read_as_timm_reads_them(tmp_path):
    timm, st = _timm_and_safetensors()
    sd = _pretrained_sd(timm, 3)
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    st.save_file(sd, str(folder / "model.safetensors"))  # timm's first choice in a folder
    found = pretrained.require(f"timm/{TINY}", f"local-dir:{folder}")
    assert found.path == folder / "model.safetensors"
    pth = tmp_path / "mine.pth"
    torch.save(sd, pth)
    for path in (found.path, pretrained.require(f"timm/{TINY}", str(pth)).path):
        model = build_model(f"timm/{TINY}", 4)
        apply_initial_weights(model, read_checkpoint(path))
        _assert_backbone_from(model, sd, 4)


def test_missing_timm_weights_say_where_to_put_them_and_how_to_get_them(tmp_path):
    _timm_and_safetensors()
    env = child_env(HF_HOME=str(tmp_path / "empty"))
    res = run([PY, "-m", "ddp_trainer", "weights", f"timm/{TINY}"], env=env)
    assert res.returncode == 0, res.stderr
    assert "file:    model.safetensors" in res.stdout
    assert f"{tmp_path / 'empty' / 'hub' / f'models--timm--{TINY}' / 'snapshots'}" in res.stdout
    assert f"hf download timm/{TINY} model.safetensors" in res.stdout and "(missing)" in res.stdout
    with pytest.raises(ConfigError, match=r"model.weights=local-dir:.*is not there and training never downloads; "
                                          r"put model.safetensors or pytorch_model.bin into"):
        pretrained.require(f"timm/{TINY}", f"local-dir:{tmp_path / 'nothing'}")
    with pytest.raises(ConfigError, match=r"model.weights=IMAGENET1K_V1: for a timm model use DEFAULT"):
        pretrained.require(f"timm/{TINY}", "IMAGENET1K_V1")


def test_two_processes_fine_tune_from_the_hub_cache_and_log_the_file(small_args, tmp_path):
    timm, st = _timm_and_safetensors()
    home, _ = _hub_home(tmp_path, timm, st)
    env = child_env(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    res = launch(2, *small_args, f"model.name=timm/{TINY}", "model.weights=DEFAULT", "train.epochs=1", env=env)
    assert res.returncode == 0, res.stderr
    assert f"model.weights=DEFAULT: timm/{TINY} (hub cache) from {home}/hub/models--timm--{TINY}/snapshots/{REV}/model.safetensors" in res.stderr
    assert "classifier head fc. left new" in res.stderr
    missing = launch(0, *small_args, f"model.name=timm/{TINY}", "model.weights=DEFAULT", "train.epochs=1",
                     f"output_dir={tmp_path / 'other'}", env=child_env(HF_HOME=str(tmp_path / "empty")))
    assert missing.returncode == 2
    assert [l for l in missing.stderr.splitlines() if "is not there" in l][0].count("hf download") == 1


def test_a_pretrained_timm_model_s_data_settings_fill_the_keys_not_set_and_are_logged(small_args, tmp_path):
    timm, st = _timm_and_safetensors()
    from ddp_trainer import config as config_mod

    want = timm.data.resolve_data_config({}, model=timm.create_model(TINY, pretrained=False))
    name = [f"model.name=timm/{TINY}"]
    cfg = config_mod.load(None, name + ["model.weights=DEFAULT", "data.std=[0.2,0.2,0.2]"])
    assert (cfg.data.image_size, cfg.data.interpolation) == (want["input_size"][1], want["interpolation"])
    assert cfg.data.mean == list(want["mean"]) and cfg.data.val_crop_pct == want["crop_pct"]
    assert cfg.data.std == [0.2, 0.2, 0.2]  # set by the user: kept
    assert dict(cfg.taken_from_model) == {"image_size": 160, "mean": [0.5, 0.5, 0.5], "interpolation": "bilinear",
                                          "val_crop_pct": 0.95}
    # auto is off without pretrained weights; false is off with them; true is on without them
    assert config_mod.load(None, name).data.image_size == 32
    assert config_mod.load(None, name + ["model.weights=DEFAULT", "data.from_model=false"]).taken_from_model == ()
    assert config_mod.load(None, name + ["data.from_model=true"]).data.mean == [0.5, 0.5, 0.5]
    # the stored config holds the values: building from it takes nothing again
    assert config_mod.from_dict(cfg.to_dict()).taken_from_model == () and config_mod.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"^data.from_model: bad value True; only timm/NAME models carry"):
        config_mod.load(None, ["model.name=resnet18", "data.from_model=true"])

    home, _ = _hub_home(tmp_path, timm, st)
    res = launch(0, *small_args, *name, "model.weights=DEFAULT", "data.image_size=16", "train.epochs=1",
                 env=child_env(HF_HOME=str(home)))
    assert res.returncode == 0, res.stderr
    assert f"data.from_model: data.mean=[0.5, 0.5, 0.5] from timm/{TINY}'s pretrained config" in res.stderr
    assert "data.from_model: data.image_size" not in res.stderr  # set on the command line
