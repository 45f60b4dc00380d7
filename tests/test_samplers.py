"""The epoch plan: consumed samples are a prefix of the epoch's order, whatever the world size."""
from collections import Counter

import pytest

from ddp_trainer.data.samplers import EpochPlan, ExactEvalSampler, epoch_order


def plans(n, world, batch, accum=1, start=0, seed=0, epoch=0, drop_last=False):
    return [EpochPlan(n, world=world, rank=r, batch_size=batch, accum=accum, seed=seed, epoch=epoch, start=start,
                      drop_last=drop_last) for r in range(world)]


def consumed_real(ps, steps=None):
    ids = []
    for p in ps:
        for j in range(len(p) if steps is None else steps):
            for mb in p.step(j):
                ids += [k.index for k in mb if k.weight > 0]
    return ids


@pytest.mark.parametrize("n, world, batch, accum", [(100, 2, 8, 1), (41, 3, 4, 1), (10, 4, 4, 1),
                                                    (57, 2, 5, 3), (17, 8, 2, 1)])
def test_full_epoch_covers_every_sample_once(n, world, batch, accum):
    ps = plans(n, world, batch, accum)
    assert Counter(consumed_real(ps)) == Counter(range(n))
    assert len({len(p) for p in ps}) == 1  # every rank takes the same number of steps
    for j in range(len(ps[0])):
        assert len({p.micro_count(j) for p in ps}) == 1  # and the same micro-batches per step
        for p in ps:
            for mb in p.step(j):
                assert len(mb) >= 2


def test_weights_make_the_ddp_average_the_step_mean():
    n, world, batch = 23, 3, 4
    ps = plans(n, world, batch)
    for j in range(len(ps[0])):
        real = sum(1 for p in ps for mb in p.step(j) for k in mb)
        total = sum(k.weight for p in ps for mb in p.step(j) for k in mb)
        assert total == pytest.approx(world)  # so sum over ranks / world == mean over the step's samples
        for p in ps:
            for mb in p.step(j):
                for k in mb:
                    assert k.weight == pytest.approx(world / real)  # never a weight-0 repeat


def test_prefix_property_after_any_step():
    n, world, batch = 50, 2, 4
    order = epoch_order(n, 0, 0)
    ps = plans(n, world, batch)
    for j in range(len(ps[0])):
        done = consumed_real(ps, steps=j + 1)
        assert sorted(done) == sorted(order[: ps[0].consumed_after(j)])


@pytest.mark.parametrize("before, after", [(2, 1), (1, 3), (2, 3), (3, 2)])
def test_resume_with_another_world_size_sees_each_remaining_sample_once(before, after):
    n, batch = 61, 4
    first = plans(n, before, batch)
    k = 3  # steps done before the kill
    seen = consumed_real(first, steps=k)
    start = first[0].consumed_after(k - 1)
    rest = consumed_real(plans(n, after, batch, start=start))
    assert Counter(seen + rest) == Counter(range(n))


def test_order_depends_on_seed_and_epoch_only():
    assert epoch_order(20, 1, 2) == epoch_order(20, 1, 2)
    assert epoch_order(20, 1, 2) != epoch_order(20, 1, 3)
    assert epoch_order(20, 1, 2) != epoch_order(20, 2, 2)


def test_exact_eval_sampler_never_pads():
    n, world = 41, 3
    shares = [list(ExactEvalSampler(n, world, r)) for r in range(world)]
    assert sorted(sum(shares, [])) == list(range(n))
    assert [len(s) for s in shares] == [14, 14, 13]
