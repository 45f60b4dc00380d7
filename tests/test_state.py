"""The state registry, the train state, and the checkpoint manager's save policy."""
from pathlib import Path

import pytest
import torch

from ddp_trainer.checkpoint.format import Checkpoint
from ddp_trainer.checkpoint.policy import BestRanking, CheckpointManager
from ddp_trainer.checkpoint.registry import LoadContext, SaveContext, StateRegistry
from ddp_trainer.config import CheckpointConfig
from ddp_trainer.launch.dist import Dist
from ddp_trainer.training.state import TrainState


class Piece:
    """A component made of two functions (save() -> value, load(value))."""

    def __init__(self, save, load=None):
        self._save = save
        if load is not None:
            self.load = lambda value, ctx: load(value)

    def save(self, ctx):
        return self._save()


def restore(reg: StateRegistry, entries: dict) -> list:
    return reg.load_state_dict(LoadContext(Checkpoint("test.pt", "ddp_trainer", entries)))


def test_registry_assembles_and_restores_components_in_order():
    calls = []
    reg = StateRegistry()
    weights = {"w": torch.ones(2)}
    reg.register("meta", Piece(lambda: {"format": "x", "version": 1}), flat=True)
    reg.register("model", Piece(lambda: dict(weights), lambda sd: calls.append(("model", sd["w"].sum().item()))))
    reg.register("counter", Piece(lambda: {"epoch": 3, "step": 7},
                                  lambda entries: calls.append(("counter", entries["step"]))), flat=True)
    reg.register("collective", Piece(lambda: calls.append("gathered") or [1, 2]), every_rank=True)
    state = reg.state_dict(SaveContext(), is_main=True)
    assert list(state) == ["format", "version", "model", "epoch", "step", "collective"]
    assert reg.state_dict(SaveContext(), is_main=False) is None  # other ranks: only the every_rank components ran
    assert calls == ["gathered", "gathered"]
    calls.clear()
    assert restore(reg, state) == ["model", "counter"]  # meta and collective have no load
    assert calls == [("model", 2.0), ("counter", 7)]
    calls.clear()
    assert restore(reg, {"step": 1}) == ["counter"]  # a file without a model entry: the model is left
    assert calls == [("counter", 1)]
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("model", Piece(dict))


def test_a_component_receives_the_save_and_load_contexts():
    seen = []

    class Loop:
        def save(self, ctx):
            seen.append(ctx.epoch_complete)
            return {"epoch_complete": ctx.epoch_complete}

        def load(self, entries, ctx):
            seen.append((ctx.checkpoint.path, ctx.world_size, ctx.rank))

    reg = StateRegistry()
    reg.register("loop", Loop(), flat=True)
    assert reg.state_dict(SaveContext(epoch_complete=True), is_main=True) == {"epoch_complete": True}
    reg.load_state_dict(LoadContext(Checkpoint("x.pt", "ddp_trainer", {}), world_size=3, rank=2))
    assert seen == [True, ("x.pt", 3, 2)]


def test_adding_a_component_is_one_register_call():
    reg = StateRegistry()
    ema = {"w": torch.zeros(1)}
    reg.register("model_ema", Piece(lambda: dict(ema), lambda sd: ema.update(sd)))  # the whole change
    saved = reg.state_dict(SaveContext(), is_main=True)
    ema["w"] = torch.full((1,), 5.0)
    restore(reg, saved)
    assert ema["w"].item() == 0.0


def test_train_state_round_trip_mid_epoch_and_after_a_complete_epoch():
    s = TrainState(epoch=2, position=48, step=11)
    best = BestRanking("val_loss", "min", 1, best=0.5)
    mid = {**s.entries(epoch_complete=False, loss_sum=12.5, loss_count=48.0), **best.save(SaveContext())}
    back, back_best = TrainState(), BestRanking("val_loss", "min", 1)
    back.restore(mid)
    back_best.load(mid, LoadContext(Checkpoint("last.pt", "ddp_trainer", mid)))
    assert (back.epoch, back.position, back.step, back_best.best, back.loss_sum, back.loss_count) == \
        (2, 48, 11, 0.5, 12.5, 48.0)
    done = s.entries(epoch_complete=True, loss_sum=30.0, loss_count=120.0)
    back.restore(done)
    assert (back.epoch, back.position, back.loss_sum) == (3, 0, 0.0)  # the next epoch, from its start
    back.restore({"epoch": 4})  # the classic {"net", "optimizer", "epoch"} dict: resume at epoch + 1
    assert (back.epoch, back.position, back.step) == (5, 0, 0)


def test_best_ranking_keeps_the_k_best_and_names_the_files():
    r = BestRanking("val_acc1", "max", 2)
    assert r.judge(0.5, 0).is_best and r.judge(0.7, 1).also == ("best_epoch_0001.pt",)
    j = r.judge(0.6, 2)  # better than epoch 0, not the best: it takes epoch 0's place among the 2 best
    assert (j.is_best, j.also, j.remove) == (False, ("best_epoch_0002.pt",), ("best_epoch_0000.pt",))
    assert r.judge(0.1, 3) == type(j)(False)  # neither best nor among the 2 best
    assert r.save(SaveContext()) == {"best": 0.7, "best_k": [[0.7, 1], [0.6, 2]]}


@pytest.mark.parametrize("every_epochs, epochs, best, stop, expect", [
    (1, 5, False, False, [True] * 5),
    (2, 5, False, False, [False, True, False, True, True]),  # the last epoch always
    (0, 5, False, False, [False, False, False, False, True]),
    (0, 5, True, False, [True] * 5),  # a new best always
    (0, 5, False, True, [True] * 5),  # before a stop always
])
def test_epoch_save_policy(every_epochs, epochs, best, stop, expect, tmp_path: Path):
    cfg = CheckpointConfig(every_epochs=every_epochs)
    m = CheckpointManager(cfg, tmp_path, Dist.single(), StateRegistry(), epochs)
    assert [m.should_save_epoch(e, best, stop) for e in range(epochs)] == expect


def test_step_save_policy(tmp_path: Path):
    m = CheckpointManager(CheckpointConfig(every_steps=3), tmp_path, Dist.single(),
                          StateRegistry(), 2)
    assert [s for s in range(1, 10) if m.should_save_step(s, position=s * 8, epoch_size=100)] == [3, 6, 9]
    assert not m.should_save_step(12, position=100, epoch_size=100)  # the epoch's end: the epoch save follows
    off = CheckpointManager(CheckpointConfig(), tmp_path, Dist.single(), StateRegistry(), 2)
    assert not any(off.should_save_step(s, s, 100) for s in range(1, 50))
