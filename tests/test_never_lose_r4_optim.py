"""Issue 28 B: the optimizer's state belongs to its parameters, by name.

In-process tests drive the real optimizer component through a real checkpoint file (written with
torch.save, read by the reader); one real run per class shows the same through the command line.
A file "as today's code wrote it" is torch's positional state dict, without parameter names.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import PY, ROOT, child_env, run

from ddp_trainer.checkpoint.format import meta_entries, with_checksum
from ddp_trainer.checkpoint.reader import read_checkpoint
from ddp_trainer.checkpoint.registry import LoadContext, SaveContext
from ddp_trainer.checkpoint.weights import canonical_state_dict
from ddp_trainer.config import OptimConfig
from ddp_trainer.errors import CheckpointError
from ddp_trainer.training.components import OptimizerState
from ddp_trainer.training.optim import build_optimizer

HELPERS = ROOT / "tests" / "helpers"


def env(**extra: str) -> dict:
    return child_env(PYTHONPATH=f"{ROOT}{os.pathsep}{HELPERS}", **extra)


def ordered(monkeypatch, order: str = "ab", freeze: str = "") -> torch.nn.Module:
    """The helper's ``named_models.ordered`` model, registering ``a`` and ``b`` in ``order``."""
    import sys
    sys.path.insert(0, str(HELPERS))
    try:
        import named_models
    finally:
        sys.path.remove(str(HELPERS))
    monkeypatch.setenv("NAMED_ORDER", order)
    monkeypatch.setenv("NAMED_FREEZE", freeze)
    torch.manual_seed(0)
    return named_models.ordered(3)


def trained(model: torch.nn.Module, cfg: OptimConfig, steps: int = 2) -> torch.optim.Optimizer:
    opt = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(4, 3, 8, 8, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def write(path: Path, model: torch.nn.Module, optimizer_entry: dict, cfg: OptimConfig):
    """A checkpoint file of ours holding ``optimizer_entry``, read back by the reader."""
    entries = {**meta_entries(monitor="val_acc", class_to_idx={"x": 0, "y": 1, "z": 2}, model_name="named_models:ordered",
                              config={"optim": dataclasses.asdict(cfg)}, world_size=1),
               "model": canonical_state_dict(model), "optimizer": optimizer_entry, "epoch": 0}
    torch.save(with_checksum(entries), path)
    return read_checkpoint(path)


def saved(model, opt, cfg) -> dict:
    """What this project writes for the optimizer."""
    return OptimizerState(opt, cfg, model).save(SaveContext())


def moments(model: torch.nn.Module, opt: torch.optim.Optimizer, key: str = "momentum_buffer") -> dict:
    """Each parameter's ``key`` state by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: opt.state[p][key] for g in opt.param_groups for p in g["params"] if p in opt.state}


def restore(ckpt, model, cfg) -> torch.optim.Optimizer:
    opt = build_optimizer(model, cfg)
    OptimizerState(opt, cfg, model).load(ckpt.optimizer, LoadContext(ckpt))
    return opt


FORMS = {"by name": saved, "positional (today's files)": lambda model, opt, cfg: opt.state_dict()}


# -- 4. the config's settings win over the file's ---------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
def test_config_optimizer_settings_win_over_the_files_and_the_log_says_so(form, monkeypatch, tmp_path, caplog):
    model = ordered(monkeypatch)
    old = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.05)
    opt = trained(model, old)
    ckpt = write(tmp_path / "a.pt", model, FORMS[form](model, opt, old), old)
    new = OptimConfig(name="sgd", lr=0.1, momentum=0.5, nesterov=True, weight_decay=0.01)
    with caplog.at_level(logging.INFO, logger="ddp_trainer"):
        back = restore(ckpt, model, new)
    assert [(g["momentum"], g["nesterov"], g["weight_decay"]) for g in back.param_groups] == \
        [(0.5, True, 0.01), (0.5, True, 0.0)]
    mine, theirs = moments(model, back), moments(model, opt)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    line = next(r.getMessage() for r in caplog.records if "optimizer settings" in r.getMessage())
    assert "momentum: 0.9 -> 0.5" in line and "nesterov: False -> True" in line
    assert "weight_decay: [0.05, 0.0] -> [0.01, 0.0]" in line


def test_a_resume_with_other_optimizer_settings_trains_and_saves_with_them(small_args, tmp_path):
    args = [*small_args, "optim.name=sgd", "optim.lr=0.05", "train.epochs=1"]
    assert run([PY, str(ROOT / "launch.py"), *args], env=env()).returncode == 0
    res = run([PY, str(ROOT / "launch.py"), *args, "train.epochs=2", "optim.momentum=0.5", "optim.nesterov=true"],
              env=env())
    assert res.returncode == 0, res.stderr
    assert "resume: optimizer settings from the config, not the checkpoint: momentum: 0.9 -> 0.5, nesterov: " \
           "False -> True" in res.stderr
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert [(g["momentum"], g["nesterov"]) for g in state["optimizer"]["param_groups"]] == [(0.5, True)] * 2
    # the next resume with the same settings: nothing changed, nothing said
    res = run([PY, str(ROOT / "launch.py"), *args, "train.epochs=3", "optim.momentum=0.5", "optim.nesterov=true"],
              env=env())
    assert res.returncode == 0, res.stderr
    assert "optim.momentum" not in res.stderr and "optimizer settings" not in res.stderr


# -- 5. a change of parameter groups regroups the state by name -------------------------------------

@pytest.mark.parametrize("form", FORMS)
def test_a_change_of_parameter_groups_regroups_the_moments_by_name(form, monkeypatch, tmp_path, caplog):
    model = ordered(monkeypatch)
    old = OptimConfig(name="sgd", lr=0.1)  # [weights, biases]
    opt = trained(model, old)
    ckpt = write(tmp_path / "a.pt", model, FORMS[form](model, opt, old), old)
    new = OptimConfig(name="sgd", lr=0.1, norm_weight_decay=0.0)  # [everything: no norm layers here, []]
    with caplog.at_level(logging.WARNING, logger="ddp_trainer"):
        back = restore(ckpt, model, new)
    assert [len(g["params"]) for g in back.param_groups] == [8, 0]
    mine, theirs = moments(model, back), moments(model, opt)
    assert len(mine) == 8 and mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not caplog.records


def test_a_resume_with_other_parameter_groups_keeps_every_moment(small_args, tmp_path):
    args = [*small_args, "train.epochs=1"]  # adamw: each parameter's step count shows what was carried
    assert run([PY, str(ROOT / "launch.py"), *args], env=env()).returncode == 0
    steps = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"]
    res = run([PY, str(ROOT / "launch.py"), *args, "train.epochs=2", "optim.norm_weight_decay=0.0"], env=env())
    assert res.returncode == 0, res.stderr
    assert "skipped" not in res.stderr
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    counts = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert counts == {float(state["step"])} and state["step"] == 2 * steps


# -- 6. moments are matched by name; a mismatch is refused, naming the parameters -------------------

def test_moments_follow_their_names_when_parameters_register_in_another_order(monkeypatch, tmp_path):
    model = ordered(monkeypatch, "ab")
    cfg = OptimConfig(name="sgd", lr=0.1)
    opt = trained(model, cfg)
    ckpt = write(tmp_path / "a.pt", model, saved(model, opt, cfg), cfg)
    other = ordered(monkeypatch, "ba")
    other.load_state_dict(ckpt.model)
    assert [n for n, _ in other.named_parameters()] != [n for n, _ in model.named_parameters()]
    back = restore(ckpt, other, cfg)
    mine, theirs = moments(other, back), moments(model, opt)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("form", FORMS)
def test_moments_of_other_parameters_are_refused_naming_them(form, monkeypatch, tmp_path):
    model = ordered(monkeypatch)
    cfg = OptimConfig(name="sgd", lr=0.1)
    opt = trained(model, cfg)
    ckpt = write(tmp_path / "a.pt", model, FORMS[form](model, opt, cfg), cfg)
    frozen = ordered(monkeypatch, freeze="a")  # the optimizer holds 6 parameters, the file 8
    with pytest.raises(CheckpointError) as err:
        restore(ckpt, frozen, cfg)
    text = err.value.message
    assert str(tmp_path / "a.pt") in text and "optimizer" in text
    assert "a.weight" in text if form == "by name" else "group 0: 4 in the checkpoint, 3 in the model" in text
    assert "model.init_from" in text  # the fix: keep the weights, start the optimizer new


@pytest.mark.stacks  # resume by parameter name on the second stack too
def test_a_reordered_model_resumes_bitwise_as_if_nothing_changed(demo_small, tmp_path):
    def args(out: Path, epochs: int) -> list[str]:
        return [f"data.root={demo_small}", f"output_dir={out}", "model.name=named_models:ordered",
                "data.image_size=16", "data.batch_size=8", "data.num_workers=0", f"train.epochs={epochs}",
                "optim.name=sgd", "optim.lr=0.05", "seed=3", "sched.name=none", "sched.warmup_epochs=0"]
    # a constant lr: the schedule does not depend on train.epochs, so 1 + 1 epochs can equal 2
    assert run([PY, str(ROOT / "launch.py"), *args(tmp_path / "ref", 2)], env=env()).returncode == 0
    assert run([PY, str(ROOT / "launch.py"), *args(tmp_path / "run", 1)], env=env()).returncode == 0
    res = run([PY, str(ROOT / "launch.py"), *args(tmp_path / "run", 2)], env=env(NAMED_ORDER="ba"))
    assert res.returncode == 0, res.stderr
    a = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


# -- 7. our own optimizer state failing to load is an error, unless optim.name changed -------------

def test_our_optimizer_state_that_does_not_fit_is_an_error(monkeypatch, tmp_path):
    model = ordered(monkeypatch)
    cfg = OptimConfig(name="sgd", lr=0.1)
    opt = trained(model, cfg)
    entry = saved(model, opt, cfg)
    entry["state"][0]["momentum_buffer"] = torch.zeros(5)  # the first parameter's buffer, another shape
    ckpt = write(tmp_path / "a.pt", model, entry, cfg)
    with pytest.raises(CheckpointError) as err:
        restore(ckpt, model, cfg)
    first = [n for n, _ in model.named_parameters()][0]
    assert f"{first}: momentum_buffer (5,)" in err.value.message and "model.init_from" in err.value.message


def test_another_optim_name_starts_the_moments_fresh_in_one_line(monkeypatch, tmp_path, caplog):
    model = ordered(monkeypatch)
    cfg = OptimConfig(name="adamw", lr=0.01)
    opt = trained(model, cfg)
    ckpt = write(tmp_path / "a.pt", model, saved(model, opt, cfg), cfg)
    with caplog.at_level(logging.INFO, logger="ddp_trainer"):
        back = restore(ckpt, model, OptimConfig(name="sgd", lr=0.1))
    assert not back.state
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["resume: optim.name changed (adamw -> sgd): the optimizer's moments start fresh"]


def test_a_resume_whose_optimizer_state_does_not_fit_writes_nothing(demo_small, tmp_path):
    out = tmp_path / "run"
    args = [f"data.root={demo_small}", f"output_dir={out}", "model.name=named_models:ordered", "data.image_size=16",
            "data.batch_size=8", "data.num_workers=0", "train.epochs=1", "optim.name=sgd", "optim.lr=0.05"]
    assert run([PY, str(ROOT / "launch.py"), *args], env=env()).returncode == 0
    def files() -> dict[str, bytes]:  # all but the lock record, which each run writes when it claims the folder
        return {p.name: p.read_bytes() for p in [*out.iterdir(), *(out / "checkpoints").iterdir()]
                if p.is_file() and p.name != ".lock"}
    before = files()
    res = run([PY, str(ROOT / "launch.py"), *args, "train.epochs=2"], env=env(NAMED_FREEZE="a"))
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "a.weight" in lines[0] and "model.init_from" in lines[0], res.stderr
    assert files() == before
