"""Issue 28 C: names inside a model are the model's. ``module.`` and ``_orig_mod.`` are removed only
where a wrapper put them (a leading prefix on every key, from DataParallel / DDP / torch.compile),
never inside a key; a child named ``_orig_mod`` is not the compiled model's original."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from conftest import PY, ROOT, child_env, run
from torch import nn

from ddp_trainer.checkpoint.reader import read_checkpoint
from ddp_trainer.checkpoint.weights import strip_wrapper_prefixes
from ddp_trainer.launch.mode import unwrap

HELPERS = ROOT / "tests" / "helpers"
sys.path.insert(0, str(HELPERS))
import named_models  # noqa: E402  (a helper module of tests/helpers, as the runs below load it)

sys.path.remove(str(HELPERS))


def env() -> dict:
    return child_env(PYTHONPATH=f"{ROOT}{os.pathsep}{HELPERS}")


def keys(*names: str) -> dict[str, torch.Tensor]:
    return {n: torch.zeros(1) for n in names}


def test_wrapper_prefixes_are_removed_only_where_a_wrapper_put_them():
    stripped = lambda *names: sorted(strip_wrapper_prefixes(keys(*names))[0])  # noqa: E731
    # a wrapper prefixes every key; what follows it is the model's own, "module" children included
    assert stripped("module.a.weight", "module.module.weight") == ["a.weight", "module.weight"]
    assert stripped("_orig_mod.module.x", "_orig_mod.module.y") == ["x", "y"]  # compile over DDP
    # the model's own names: "module" as a first segment of some keys, or inside a key
    assert stripped("module.weight", "body.module.weight", "head.weight") == \
        ["body.module.weight", "head.weight", "module.weight"]
    assert stripped("body.module.weight", "body._orig_mod.bias") == ["body._orig_mod.bias", "body.module.weight"]
    assert strip_wrapper_prefixes(keys("module.a", "module.b"))[1] == 2  # counted where stripped


def test_a_child_named_orig_mod_is_not_taken_for_the_compiled_model():
    model = named_models.orig_mod_child(3)
    assert unwrap(model) is model
    assert unwrap(torch.compile(model)) is model  # compile's wrapper: lazy, nothing is compiled here
    assert unwrap(nn.DataParallel(torch.compile(model))) is model


def test_a_model_of_our_format_keeps_its_module_child_names_when_read(tmp_path: Path):
    model = named_models.module_child(3)
    from ddp_trainer.checkpoint.format import meta_entries, with_checksum

    entries = {**meta_entries(monitor="val_acc", class_to_idx={"x": 0, "y": 1, "z": 2},
                              model_name="named_models:module_child", config={}, world_size=1),
               "model": model.state_dict()}
    torch.save(with_checksum(entries), tmp_path / "a.pt")
    assert read_checkpoint(tmp_path / "a.pt").model.keys() == model.state_dict().keys()
    torch.save(nn.DataParallel(model).state_dict(), tmp_path / "dp.pt")  # a plain file from a wrapped model
    assert read_checkpoint(tmp_path / "dp.pt").model.keys() == model.state_dict().keys()


def test_a_model_with_module_children_resumes_evaluates_predicts_and_converts(demo_small: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = [f"data.root={demo_small}", f"output_dir={out}", "model.name=named_models:module_child",
            "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "train.epochs=1"]
    assert run([PY, str(ROOT / "launch.py"), *args], env=env()).returncode == 0
    res = run([PY, str(ROOT / "launch.py"), *args, "train.epochs=2"], env=env())
    assert res.returncode == 0, res.stderr
    last = out / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    cli = [PY, "-m", "ddp_trainer"]
    res = run([*cli, "evaluate", "--checkpoint", str(last), "--json"], env=env())
    assert res.returncode == 0 and '"count": 40' in res.stdout, res.stderr
    image = next((demo_small / "val").rglob("*.png"))
    res = run([*cli, "predict", "--checkpoint", str(last), str(image)], env=env())
    assert res.returncode == 0 and res.stdout.startswith(f"{image}: "), res.stderr
    res = run([*cli, "convert", str(last), str(tmp_path / "plain.pt")], env=env())
    assert res.returncode == 0, res.stderr
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    named_models.module_child(10).load_state_dict(plain)  # strict: the model's own names


def test_a_model_with_a_child_named_orig_mod_trains_and_validates(demo_small: Path, tmp_path: Path):
    res = run([PY, str(ROOT / "launch.py"), f"data.root={demo_small}", f"output_dir={tmp_path / 'run'}",
               "model.name=named_models:orig_mod_child", "data.image_size=16", "data.batch_size=8",
               "data.num_workers=0", "train.epochs=1"], env=env())
    assert res.returncode == 0, res.stderr
    assert "epoch 0: train_loss=" in res.stderr
