"""Every dataset size, world size, batch and accumulation: micro-batches BatchNorm can train on.

For n in 1..300, world 1..4, batch 1..8 and accumulation 1..2 (both drop_last settings): every rank
gets only micro-batches of allowed sizes (at least min_micro_batch(batch), at most one more than the
batch or 2 x that minimum) and the same number of them in every step, no sample has
weight 0, and with drop_last=false every sample is trained exactly once per epoch.
"""
from collections import Counter

import pytest

from ddp_trainer.data.samplers import EpochPlan, min_micro_batch


def _plans(n, world, batch, accum, drop_last, start=0):
    return [EpochPlan(n, world=world, rank=r, batch_size=batch, accum=accum, seed=3, epoch=1, start=start,
                      drop_last=drop_last) for r in range(world)]


def _check(n, world, batch, accum, drop_last):
    ps = _plans(n, world, batch, accum, drop_last)
    steps = len(ps[0])
    assert all(len(p) == steps for p in ps)
    lo = min_micro_batch(batch)
    full = world * batch * accum
    # a step smaller than `lo` per rank exists only when the whole set is one partial step
    floor = lo if n >= world * lo else n // world
    trained = Counter()
    for j in range(steps):
        counts = {p.micro_count(j) for p in ps}
        assert len(counts) == 1, (n, world, batch, accum, j)
        step_total = 0
        for p in ps:
            sizes = p.micro_sizes(j)
            assert len(sizes) == p.micro_count(j)
            assert min(sizes) >= floor, (n, world, batch, accum, drop_last, j, sizes)
            assert max(sizes) <= max(batch + 1, 2 * lo), (n, world, batch, accum, drop_last, j, sizes)
            step_total += sum(sizes)
            for mb in p.step(j):
                assert [k.weight for k in mb] == [world / (p.consumed_after(j) - (p.consumed_after(j - 1) if j else 0))] * len(mb)
                trained.update(k.index for k in mb)
        assert ps[0].consumed_after(j) - (ps[0].consumed_after(j - 1) if j else 0) == step_total
    if drop_last:
        if n >= full:
            assert steps == n // full and sum(trained.values()) == steps * full  # only full steps
        else:
            assert steps == 1 and ps[0].partial_only and trained == Counter(range(n))
    else:
        assert trained == Counter(range(n))  # every sample exactly once
    return trained


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_size_gives_allowed_micro_batches(world):
    checked = 0
    for batch in range(1, 9):
        for accum in (1, 2):
            for n in range(2 * world, 301):
                for drop_last in (True, False):
                    _check(n, world, batch, accum, drop_last)
                    checked += 1
    assert checked == 8 * 2 * (301 - 2 * world) * 2


def test_sets_smaller_than_two_per_rank_get_no_step():
    # the trainer refuses these before training (test_errors); the plan itself never forms a 1-sample batch
    for world in (2, 3, 4):
        for n in range(1, 2 * world):
            for drop_last in (True, False):
                assert all(len(p) == 0 for p in _plans(n, world, 4, 1, drop_last))


def test_the_161_image_case_of_the_issue():
    # 161 images, batch 16, two processes: the old plan gave one rank a 1-sample micro-batch
    for drop_last in (True, False):
        ps = _plans(161, 2, 16, 1, drop_last)
        sizes = [s for p in ps for j in range(len(p)) for s in p.micro_sizes(j)]
        assert min(sizes) >= 8
    kept = _plans(161, 2, 16, 1, True)
    assert len(kept[0]) == 5 and kept[0].dropped == 1
    folded = _plans(161, 2, 16, 1, False)
    assert len(folded[0]) == 5 and folded[0].dropped == 0
    assert sorted(p.micro_sizes(4) for p in folded) == [[8, 8], [9, 8]]


def test_dropped_tail_differs_between_epochs():
    n, world, batch = 37, 2, 4
    def left_out(epoch):
        ps = [EpochPlan(n, world=world, rank=r, batch_size=batch, accum=1, seed=0, epoch=epoch) for r in range(world)]
        seen = {k.index for p in ps for j in range(len(p)) for mb in p.step(j) for k in mb}
        return set(range(n)) - seen
    tails = [left_out(e) for e in range(4)]
    assert all(len(t) == 37 % 8 for t in tails)
    assert len({frozenset(t) for t in tails}) > 1


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("before, after", [(2, 1), (1, 3), (2, 3), (3, 2), (4, 3)])
def test_resume_on_another_world_size_keeps_sizes_and_coverage(before, after, drop_last):
    n, batch = 163, 4
    first = _plans(n, before, batch, 1, drop_last)
    k = 3
    seen = [k_.index for p in first for j in range(k) for mb in p.step(j) for k_ in mb]
    start = first[0].consumed_after(k - 1)
    rest = _plans(n, after, batch, 1, drop_last, start=start)
    for j in range(len(rest[0])):
        assert len({p.micro_count(j) for p in rest}) == 1
        assert all(min(p.micro_sizes(j)) >= min_micro_batch(batch) for p in rest)
    done = seen + [k_.index for p in rest for j in range(len(p)) for mb in p.step(j) for k_ in mb]
    assert len(done) == len(set(done))  # nothing twice
    if not drop_last:
        assert sorted(done) == list(range(n))  # and, without drop_last, everything once
    else:
        assert n - len(done) < after * batch  # only the tail past the last full step is left out


def test_plan_of_imagenet_size_is_cheap_and_lazy():
    import time
    import tracemalloc

    tracemalloc.start()
    t0 = time.perf_counter()
    plan = EpochPlan(1_281_167, world=64, rank=63, batch_size=32, accum=1, seed=0, epoch=5)
    first = plan.step(0)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(plan) == 1_281_167 // (64 * 32) and len(first[0]) == 32
    # the order is one tensor; nothing per sample is built up front (bench/scale.py times this)
    assert peak < 5_000_000, peak
    assert elapsed < 5.0
