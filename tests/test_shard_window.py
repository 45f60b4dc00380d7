"""data.sampler=shard_window: every sample once per epoch, each rank reading its own run of shards a
window at a time, a pure function of (seed, epoch, world), the tail by data.drop_last as the other
samplers; a real 2-process run trains what the definition says and resumes mid-epoch bitwise."""
import os

import pytest
import torch
from conftest import PY, ROOT, child_env, kept_mid_epoch, launch, run
from test_sampler_runs import recorded  # FAULT_RECORD_SAMPLES's files, per rank and epoch

from ddp_trainer.data.samplers import EpochPlan, SamplerSpec, shard_window_order

HELPERS = ROOT / "tests" / "helpers"
SIZES = [7, 5, 6, 8, 7, 7, 3, 9, 6, 6, 4, 8, 5, 7]  # samples per shard: uneven, as byte-sized shards are


def shard_ids(sizes=SIZES) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def spec(window: int = 2, sizes=SIZES) -> SamplerSpec:
    return SamplerSpec("shard_window", shards=shard_ids(sizes), window=window)


def plan(world: int, rank: int, *, window: int = 2, seed: int = 0, epoch: int = 0, start: int = 0,
         drop_last: bool = True, batch: int = 4) -> EpochPlan:
    return EpochPlan(sum(SIZES), world=world, rank=rank, batch_size=batch, accum=1, seed=seed, epoch=epoch,
                     start=start, drop_last=drop_last, sampler=spec(window))


def stream(p: EpochPlan) -> list[int]:
    return [k.index for mb in p.micro_batches() for k in mb]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_once_per_epoch_across_ranks(world):
    n = sum(SIZES)
    for drop_last in (False, True):
        seen = [i for r in range(world) for i in stream(plan(world, r, drop_last=drop_last))]
        dropped = plan(world, 0, drop_last=drop_last).dropped
        assert len(seen) == len(set(seen)) == n - dropped
        # the tail as the plan sampler leaves it: the same count, nothing when drop_last is off
        assert dropped == EpochPlan(n, world=world, rank=0, batch_size=4, accum=1, seed=0, epoch=0,
                                    drop_last=drop_last).dropped
        assert (dropped == 0) == (not drop_last or n % (world * 4) == 0)
    order = shard_window_order(shard_ids(), 0, 0, world, 2).tolist()
    assert sorted(order) == list(range(n))


def _segments(ids: list[int], shard_of: torch.Tensor, window: int) -> int:
    """The fewest consecutive pieces of ``ids`` that each touch at most ``window`` shards (greedy)."""
    pieces, current = 0, set()
    for i in ids:
        s = int(shard_of[i])
        if s not in current and len(current) == window:
            current = set()
        if not current:
            pieces += 1
        current.add(s)
    return pieces


@pytest.mark.parametrize("world,window", [(1, 2), (2, 2), (3, 3), (2, 1)])
def test_each_rank_reads_its_own_shards_a_window_at_a_time(world, window):
    sizes = [40, 37, 45, 41, 39, 44, 38, 42] * 4  # 32 shards
    shards = shard_ids(sizes)
    n = len(shards)
    runs = []
    for r in range(world):
        p = EpochPlan(n, world=world, rank=r, batch_size=8, accum=1, seed=1, epoch=0, drop_last=False,
                      sampler=spec(window, sizes))
        ids = stream(p)
        touched = {int(shards[i]) for i in ids}
        runs.append(touched)
        # a run of about n / world samples covers its share of the shards (two may be split with a neighbour)
        assert len(touched) <= len(sizes) // world + 2
        assert _segments(ids, shards, window) <= -(-len(touched) // window) + 1
        # the plan sampler's stream, by contrast, jumps between shards all the time
        plain = EpochPlan(n, world=world, rank=r, batch_size=8, accum=1, seed=1, epoch=0, drop_last=False)
        assert _segments(stream(plain), shards, window) > 3 * _segments(ids, shards, window)
    shared = sum(len(a & b) for k, a in enumerate(runs) for b in runs[k + 1:])
    assert shared <= world - 1  # only the shards cut between two ranks' runs are read by both


def test_the_order_is_a_pure_function_of_seed_and_epoch():
    a = shard_window_order(shard_ids(), 3, 1, 2, 2)
    assert torch.equal(a, shard_window_order(shard_ids(), 3, 1, 2, 2))
    assert not torch.equal(a, shard_window_order(shard_ids(), 3, 2, 2, 2))  # another epoch
    assert not torch.equal(a, shard_window_order(shard_ids(), 4, 1, 2, 2))  # another seed
    # the shards' own order changes between epochs, not only the samples within windows
    firsts = {int(shard_ids()[int(shard_window_order(shard_ids(), 0, e, 1, 1)[0])]) for e in range(8)}
    assert len(firsts) > 2
    # shard numbers need not be contiguous or start at 0 (a held-out or skipped subset of a set)
    ids = shard_ids() * 3 + 5
    assert torch.equal(shard_window_order(ids, 3, 1, 2, 2), a)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_plan_started_mid_epoch_is_the_rest_of_the_same_plan(world):
    for drop_last in (True, False):
        for r in range(world):
            full = plan(world, r, drop_last=drop_last)
            for j in range(len(full) - 1):
                rest = plan(world, r, drop_last=drop_last, start=full.consumed_after(j))
                assert [full.step(k) for k in range(j + 1, len(full))] == [rest.step(k) for k in range(len(rest))]


def test_identity_names_what_the_order_depends_on():
    a = spec(2).identity(2)
    assert a["sampler"] == "shard_window" and a["world_size"] == 2 and a["window"] == 2
    assert spec(3).identity(2) != a and spec(2).identity(3) != a
    assert spec(2, [4] * 30).identity(2) != spec(2, [6] * 20).identity(2)  # the same samples, other shards


def test_window_and_cache_keys_are_checked():
    from ddp_trainer.config import load
    from ddp_trainer.errors import ConfigError

    assert load(None, ["data.sampler=shard_window", "data.shard_window=8"]).data.shard_window == 8
    with pytest.raises(ConfigError, match=r"data.shard_window: bad value 0"):
        load(None, ["data.shard_window=0"])
    with pytest.raises(ConfigError, match=r"data.shard_cache_bytes: bad value -1"):
        load(None, ["data.shard_cache_bytes=-1"])


def test_a_folder_tree_is_refused_in_one_line(demo_small):
    res = run([PY, "-m", "ddp_trainer", "check", f"data.root={demo_small}", "data.sampler=shard_window"])
    assert res.returncode == 2, res.stderr
    errors = [l for l in res.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and "shard_window" in errors[0] and str(demo_small) in errors[0], res.stderr
    assert "data.sampler=plan" in errors[0] and "Traceback" not in res.stderr


def window_args(root) -> list[str]:
    return [f"data.root={root}", "model.name=tiny_cnn_bn", "data.image_size=16", "data.batch_size=8",
            "data.num_workers=1", "data.augment=[flip,random_resized_crop]", "data.sampler=shard_window",
            "data.shard_window=2", "train.epochs=2", "checkpoint.every_steps=3", "optim.lr=0.05", "seed=3"]


@pytest.mark.slow
def test_a_two_process_run_trains_the_definition_and_resumes_bitwise(demo_shards, reference_run, tmp_path_factory,
                                                                      tmp_path):
    from ddp_trainer.data.shard_set import ShardIndex
    from ddp_trainer.data.shard_store import LocalShardStore

    rec = tmp_path_factory.mktemp("window_rec")
    env = child_env(PYTHONPATH=f"{ROOT}{os.pathsep}{HELPERS}", FAULT_RECORD_SAMPLES=str(rec))
    ref = reference_run(2, window_args(demo_shards), env)
    assert "data.sampler=shard_window" in ref.stderr
    index = ShardIndex.open(LocalShardStore(demo_shards), "train")
    shards = torch.tensor(index.shard_ids.tolist(), dtype=torch.int64)
    n = len(index)
    assert len(set(shards.tolist())) >= 8  # enough shards for windows to mean something
    seen = recorded(rec)
    consumed = n // 16 * 16  # full steps of 2 x 8; the tail dropped
    for epoch in range(2):
        order = shard_window_order(shards, 3, epoch, 2, 2)
        for r in range(2):
            assert seen[r][epoch] == order[r:consumed:2].tolist()
    # a mid-epoch checkpoint of that run, resumed, ends bitwise where the run ended
    out = tmp_path / "run"
    state = kept_mid_epoch(ref.kept, out)
    assert state["train_order"]["sampler"] == "shard_window"
    res = launch(2, *window_args(demo_shards), f"output_dir={out}")
    assert res.returncode == 0, res.stderr
    assert f"{state['position']} samples into the epoch" in res.stderr
    a = torch.load(ref.path / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
