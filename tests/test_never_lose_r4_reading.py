"""Round 4, section I: faults found by reading the code, each shown by a test that failed before."""
from __future__ import annotations

import logging

import pytest

from ddp_trainer.checkpoint.registry import LoadContext
from ddp_trainer.data.samplers import SamplerSpec, class_balanced_probabilities
from ddp_trainer.training.components import SamplerCheck
from ddp_trainer.training.state import TrainState

# --- I.1 class_balanced's identity is a digest of its probabilities ------------------------------

LABELS = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
CLASSES = ["a", "b", "c", "d"]


def _identity(weights):
    return SamplerSpec("class_balanced", probabilities=class_balanced_probabilities(LABELS, CLASSES, weights)).identity(2)


def test_class_balanced_identity_tells_a_swap_of_two_class_weights():
    # these two weightings draw other images, yet the old sum of rounded probabilities was equal
    swapped = _identity({"a": 1.0, "d": 1.0, "b": 2.0, "c": 3.0}), _identity({"a": 1.0, "d": 1.0, "b": 3.0, "c": 2.0})
    assert swapped[0] != swapped[1]
    assert _identity({"b": 2.0}) == _identity({"b": 2.0})  # the same weights: the same identity
    assert _identity(None) != _identity({"b": 2.0})


def _resumed(saved: dict, now: dict) -> TrainState:
    state = TrainState(epoch=3, position=40, step=7, loss_sum=1.0, loss_count=2.0)
    SamplerCheck(now, state).load({"train_order": saved}, LoadContext(checkpoint=None))
    return state


def test_a_mid_epoch_resume_with_swapped_class_weights_restarts_the_epoch(caplog):
    before = _identity({"b": 2.0, "c": 3.0})
    after = _identity({"b": 3.0, "c": 2.0})
    with caplog.at_level(logging.WARNING, logger="ddp_trainer"):
        state = _resumed(before, after)
    assert (state.position, state.loss_sum, state.loss_count) == (0, 0.0, 0.0)
    assert "epoch 3 restarts its order from the beginning" in caplog.text
    assert _resumed(after, after).position == 40  # unchanged weights: the position is continued


def test_an_old_class_balanced_identity_counts_as_unknown(caplog):
    now = _identity({"b": 2.0})
    old = {"sampler": "class_balanced", "probabilities": 1099511627776}  # what older versions wrote
    with caplog.at_level(logging.WARNING, logger="ddp_trainer"):
        state = _resumed(old, now)
    assert state.position == 0
    assert "unknown in a checkpoint written by an older version" in caplog.text


# --- I.2 a build removes only this host's dead builds' temporary files ---------------------------

def test_a_build_leaves_another_hosts_temporary_files_alone(demo_small, tmp_path):
    """A cache folder shared by two nodes: node-b's build in progress is a file named with its host and
    pid; its lock is held on node-b, so here it looks free and its pid looks dead."""
    from ddp_trainer.data import decoded_cache
    from ddp_trainer.data.folder_index import scan

    other = tmp_path / ".decoded-abc-1x3x16x16.u8.tmp-node-b.cluster-999999"
    other.write_bytes(b"\0" * 100)
    mine = tmp_path / f".decoded-abc-1x3x16x16.u8.tmp-{decoded_cache.this_host()}-999999"
    mine.write_bytes(b"\0" * 100)  # this host's build that was killed: its process is gone
    unnamed = tmp_path / ".decoded-abc-1x3x16x16.u8.tmp-x"
    unnamed.write_bytes(b"\0")  # no host and pid in the name: nobody can tell whose, kept
    path = decoded_cache.build(scan(demo_small / "val"), 16, tmp_path)
    assert path.exists()
    assert other.exists() and other.stat().st_size == 100  # node-b's build goes on
    assert unnamed.exists()
    assert not mine.exists()
