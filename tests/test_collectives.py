"""Collective failures are classified by where they happened and how long they waited, never by
the text of the error (torch reports a dead peer and a silent one as the same RuntimeError)."""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as tdist
from conftest import ROOT, launch, our_lines
from torch.distributed import distributed_c10d

from ddp_trainer import compat
from ddp_trainer.errors import CollectiveFailed, PeerLost, PeerTimeout
from ddp_trainer.launch.dist import Dist
from ddp_trainer.launch.environment import LaunchEnv

pytestmark = pytest.mark.stacks

HELPERS = ROOT / "tests" / "helpers"


def _dist(**kw) -> Dist:
    return Dist(env=LaunchEnv(rank=0, world_size=2), backend="gloo", device=torch.device("cpu"),
                timeout_s=4.0, init_timeout_s=60.0, **kw)


def test_the_timeout_setter_of_this_torch_is_found():
    setter = compat.group_timeout_setter()
    if hasattr(tdist, "set_timeout"):  # torch >= 2.14
        assert setter is tdist.set_timeout
    else:  # torch 2.11 .. 2.13: the same operation under its earlier name
        assert setter is distributed_c10d._set_pg_timeout


def test_an_error_that_only_mentions_a_timeout_is_not_a_timeout():
    # was: torch < 2.14 raised AttributeError("... has no attribute 'set_timeout'") after step 1, and
    # because its text holds "timeout" both ranks reported "did not answer within dist.timeout_s"
    dist = _dist()
    with pytest.raises(AttributeError, match="set_timeout"):
        with dist.training():
            raise AttributeError("module 'torch.distributed' has no attribute 'set_timeout'")
    with pytest.raises(RuntimeError, match="Timed out"):
        with dist.waiting("rank 0 to scan the data folders"):
            raise RuntimeError("Timed out waiting 3000ms for recv operation to complete")


def test_a_failed_collective_is_a_timeout_only_when_it_waited_for_the_timeout():
    dist = _dist(lowered=True)
    cause = RuntimeError("recv failed")
    with pytest.raises(PeerTimeout, match=r"rank 1 did not answer within dist.timeout_s=4 s"):
        with dist.training():
            raise CollectiveFailed("an all-reduce", 4.01, dist.timeout_now, cause)
    with pytest.raises(PeerLost, match=r"lost contact with another rank during training .*an all-reduce failed "
                                       r"after 0.1 s \(recv failed\)"):
        with dist.training():
            raise CollectiveFailed("an all-reduce", 0.1, dist.timeout_now, cause)
    early = _dist()  # before the first step: the preparation timeout is in force
    with pytest.raises(PeerTimeout, match=r"gave up after waiting 60 s for rank 0 to read the checkpoint"):
        with early.waiting("rank 0 to read the checkpoint"):
            raise CollectiveFailed("a broadcast", 60.2, early.timeout_now, cause)


def test_a_collective_names_its_operation_and_wait_on_a_real_group(tmp_path):
    # one real gloo process group of one rank; the store is a file, so nothing else can answer
    store = tdist.FileStore(str(tmp_path / "store"), 1)
    tdist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=5))
    try:
        dist = Dist(env=LaunchEnv(), backend="gloo", device=torch.device("cpu"), timeout_s=5, init_timeout_s=5)
        assert dist.max_int(7) == 7
        t0 = time.monotonic()
        with pytest.raises(CollectiveFailed) as info:
            dist._run("a broadcast", lambda: tdist.broadcast(torch.zeros(1), src=3))  # no rank 3
        assert info.value.what == "a broadcast" and info.value.waited_s <= time.monotonic() - t0
        assert not info.value.timed_out
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_a_peer_dying_inside_backward_reads_as_lost_contact_in_the_gradient_all_reduce(small_args):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HELPERS}", "OMP_NUM_THREADS": "1", "DIE_AT_STEP": "3"}
    t0 = time.monotonic()
    res = launch(2, *small_args, "model.name=dying_model:build", "dist.timeout_s=60", "train.log_every_steps=1",
                 env=env, timeout=120)
    assert res.returncode != 0
    assert time.monotonic() - t0 < 60  # well before any timeout
    errors = [l for l in our_lines(res.stderr) if l.startswith("[rank 0] error:")]
    assert len(errors) == 1, res.stderr
    assert "lost contact with another rank during training" in errors[0], errors[0]
    assert "the gradient all-reduce failed" in errors[0], errors[0]


def test_ddp_is_built_without_a_buffer_broadcast_at_every_forward():
    from torch.nn.parallel import DistributedDataParallel

    kwargs = compat.ddp_no_forward_buffer_sync()
    assert list(kwargs.values()) == [False]
    assert next(iter(kwargs)) in __import__("inspect").signature(DistributedDataParallel.__init__).parameters
