"""The state registry, the train state, and the checkpoint manager's save policy."""
from pathlib import Path

import pytest
import torch

from ddp_trainer.checkpoint.policy import CheckpointManager
from ddp_trainer.config import CheckpointConfig
from ddp_trainer.launch.dist import Dist
from ddp_trainer.launch.environment import LaunchEnv
from ddp_trainer.checkpoint.registry import StateRegistry, TrainState


def test_registry_assembles_and_restores_components_in_order():
    calls = []
    reg = StateRegistry()
    weights = {"w": torch.ones(2)}
    reg.register("meta", lambda: {"format": "x", "version": 1}, flat=True)
    reg.register("model", lambda: dict(weights), lambda sd: calls.append(("model", sd["w"].sum().item())))
    reg.register("counter", lambda: {"epoch": 3, "step": 7}, lambda entries: calls.append(("counter", entries["step"])),
                 flat=True)
    reg.register("collective", lambda: calls.append("gathered") or [1, 2], every_rank=True)
    state = reg.state_dict(is_main=True)
    assert list(state) == ["format", "version", "model", "epoch", "step", "collective"]
    assert reg.state_dict(is_main=False) is None  # other ranks: only the every_rank components ran
    assert calls == ["gathered", "gathered"]
    calls.clear()
    assert reg.load_state_dict(state) == ["model", "counter"]  # meta and collective have no load
    assert calls == [("model", 2.0), ("counter", 7)]
    calls.clear()
    assert reg.load_state_dict({"step": 1}) == ["counter"]  # a file without a model entry: the model is left
    assert calls == [("counter", 1)]
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("model", dict)


def test_adding_a_component_is_one_register_call():
    reg = StateRegistry()
    ema = {"w": torch.zeros(1)}
    reg.register("model_ema", lambda: dict(ema), lambda sd: ema.update(sd))  # the whole change
    saved = reg.state_dict(is_main=True)
    ema["w"] = torch.full((1,), 5.0)
    reg.load_state_dict(saved)
    assert ema["w"].item() == 0.0


def test_train_state_round_trip_mid_epoch_and_after_a_complete_epoch():
    s = TrainState(epoch=2, position=48, step=11, best=0.5)
    mid = s.state_dict(epoch_complete=False, loss_sum=12.5, loss_count=48.0)
    back = TrainState()
    back.load_state_dict(mid)
    assert (back.epoch, back.position, back.step, back.best, back.loss_sum, back.loss_count) == (2, 48, 11, 0.5, 12.5, 48.0)
    done = s.state_dict(epoch_complete=True, loss_sum=30.0, loss_count=120.0)
    back.load_state_dict(done)
    assert (back.epoch, back.position, back.loss_sum) == (3, 0, 0.0)  # the next epoch, from its start
    back.load_state_dict({"epoch": 4})  # the classic {"net", "optimizer", "epoch"} dict: resume at epoch + 1
    assert (back.epoch, back.position, back.step) == (5, 0, 0)


@pytest.mark.parametrize("every_epochs, epochs, best, stop, expect", [
    (1, 5, False, False, [True] * 5),
    (2, 5, False, False, [False, True, False, True, True]),  # the last epoch always
    (0, 5, False, False, [False, False, False, False, True]),
    (0, 5, True, False, [True] * 5),  # a new best always
    (0, 5, False, True, [True] * 5),  # before a stop always
])
def test_epoch_save_policy(every_epochs, epochs, best, stop, expect, tmp_path: Path):
    cfg = CheckpointConfig(every_epochs=every_epochs)
    m = CheckpointManager(cfg, tmp_path, Dist(LaunchEnv(), None, torch.device("cpu")), StateRegistry(), epochs)
    assert [m.should_save_epoch(e, best, stop) for e in range(epochs)] == expect


def test_step_save_policy(tmp_path: Path):
    m = CheckpointManager(CheckpointConfig(every_steps=3), tmp_path, Dist(LaunchEnv(), None, torch.device("cpu")),
                          StateRegistry(), 2)
    assert [s for s in range(1, 10) if m.should_save_step(s, position=s * 8, epoch_size=100)] == [3, 6, 9]
    assert not m.should_save_step(12, position=100, epoch_size=100)  # the epoch's end: the epoch save follows
    off = CheckpointManager(CheckpointConfig(), tmp_path, Dist(LaunchEnv(), None, torch.device("cpu")), StateRegistry(), 2)
    assert not any(off.should_save_step(s, s, 100) for s in range(1, 50))
