"""data.sampler: distributed, repeated_augment and class_balanced, each against its own definition,
on 1, 2 and 3 ranks, with the plan's per-step contract and mid-epoch resume."""
import math
from collections import Counter

import pytest
import torch
from torch.utils.data import DistributedSampler

from ddp_trainer import config as config_mod
from ddp_trainer.data.samplers import (
    EpochPlan,
    SamplerSpec,
    class_balanced_probabilities,
    epoch_order,
)
from ddp_trainer.errors import ConfigError

pytestmark = pytest.mark.stacks  # torch's DistributedSampler and multinomial, checked on both stacks


def plans(spec, n, world, batch, accum=1, start=0, seed=3, epoch=0, drop_last=True):
    return [EpochPlan(n, world=world, rank=r, batch_size=batch, accum=accum, seed=seed, epoch=epoch, start=start,
                      drop_last=drop_last, sampler=spec) for r in range(world)]


def per_rank(ps, steps=None):
    """Each rank's keys in load order."""
    return [[k for j in range(len(p) if steps is None else steps) for mb in p.step(j) for k in mb] for p in ps]


def check_contract(ps, batch):
    """Every rank the same steps and micro-batches per step, none below the BatchNorm floor, loss
    weights world / step size."""
    assert len({len(p) for p in ps}) == 1
    for j in range(len(ps[0])):
        assert len({p.micro_count(j) for p in ps}) == 1
        step = [k for p in ps for mb in p.step(j) for k in mb]
        for p in ps:
            for mb in p.step(j):
                assert len(mb) >= min(2, batch)
        assert sum(k.weight for k in step) == pytest.approx(len(ps))


def imbalanced_labels(classes=4, base=5, big=10):
    """Class 0 holds ``big`` times as many images as each other class."""
    return [0] * (base * big) + [c for c in range(1, classes) for _ in range(base)]


# --- distributed -------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n, batch, accum, drop_last", [(49, 4, 1, True), (49, 4, 2, False), (120, 8, 1, True)])
def test_distributed_trains_exactly_what_torchs_sampler_yields_on_each_rank(world, n, batch, accum, drop_last):
    spec = SamplerSpec("distributed")
    for epoch in (0, 1):
        ps = plans(spec, n, world, batch, accum, seed=5, epoch=epoch, drop_last=drop_last)
        check_contract(ps, batch)
        for r, keys in enumerate(per_rank(ps)):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=5)
            sampler.set_epoch(epoch)
            expected = list(sampler)
            if drop_last:  # whole steps only: with accum 1, exactly DataLoader(drop_last=True)'s batches
                expected = expected[: len(expected) // (batch * accum) * batch * accum]
            assert [k.index for k in keys] == expected
            if accum == 1:
                loader = [b.tolist() for b in torch.utils.data.DataLoader(range(n), batch_size=batch,
                                                                          sampler=sampler, drop_last=drop_last)]
                assert [[k.index for k in mb] for mb in (m for p in [ps[r]] for j in range(len(p))
                                                        for m in p.step(j))] == loader
        assert ps[0].padded == math.ceil(n / world) * world - n


def test_distributed_padding_is_a_second_draw_of_the_repeated_samples():
    n, world = 49, 3  # 51 draws: two samples repeat
    ps = plans(SamplerSpec("distributed"), n, world, 4, drop_last=False)
    keys = [k for ks in per_rank(ps) for k in ks]
    counts = Counter(k.index for k in keys)
    twice = {i for i, c in counts.items() if c == 2}
    assert len(keys) == 51 and len(twice) == 2
    assert {(k.index, k.draw) for k in keys if k.index in twice} == {(i, d) for i in twice for d in (0, 1)}


def test_distributed_resume_on_the_same_world_size_continues_each_ranks_shard():
    n, world, batch = 120, 2, 8
    spec = SamplerSpec("distributed")
    whole = per_rank(plans(spec, n, world, batch))
    first = plans(spec, n, world, batch)
    start = first[0].consumed_after(2)
    rest = per_rank(plans(spec, n, world, batch, start=start))
    for r in range(world):
        assert [k.index for k in whole[r]] == [k.index for k in whole[r][: 3 * batch] + rest[r]]


# --- repeated_augment --------------------------------------------------------------------------

def ra_order(n, reps, seed, epoch):
    """torchvision's RASampler / timm's --aug-repeats over the plan's permutation: each sample
    ``reps`` times in a row, the epoch cut at ``n`` draws; rank r takes every world-th draw."""
    return [i for i in epoch_order(n, seed, epoch) for _ in range(reps)][:n]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n, reps, batch, drop_last", [(49, 3, 4, False), (120, 3, 8, True), (50, 2, 4, True)])
def test_repeated_augment_follows_its_definition(world, n, reps, batch, drop_last):
    spec = SamplerSpec("repeated_augment", reps)
    ps = plans(spec, n, world, batch, seed=5, drop_last=drop_last)
    check_contract(ps, batch)
    order = ra_order(n, reps, 5, 0)
    consumed = ps[0].consumed_after(len(ps[0]) - 1)
    assert consumed == n - ps[0].dropped
    got = per_rank(ps)
    for r in range(world):
        # rank r's draws: positions r, r + world, ... of each step (full steps are multiples of world)
        steps = [(0 if j == 0 else ps[0].consumed_after(j - 1), ps[0].consumed_after(j)) for j in range(len(ps[0]))]
        expected = [order[p] for b, e in steps for p in range(b + r, e, world)]
        assert [k.index for k in got[r]] == expected
        assert [k.draw for k in got[r]] == [p % reps for b, e in steps for p in range(b + r, e, world)]
    # every sample's copies are distinct draws (their own augmentation); with world >= reps, on distinct ranks
    keys = [(k.index, k.draw) for ks in got for k in ks]
    assert len(keys) == len(set(keys))
    if world >= reps:
        for i in set(order[:consumed]):
            ranks = [r for r in range(world) for k in got[r] if k.index == i]
            assert len(ranks) == len(set(ranks))
    assert Counter(Counter(order).values())[reps] == n // reps  # an epoch is n draws of ~n / reps samples


@pytest.mark.parametrize("before, after", [(2, 3), (3, 1), (1, 2)])
def test_repeated_augment_resumes_on_another_world_size_with_the_rest_of_the_order(before, after):
    n, batch = 61, 4
    spec = SamplerSpec("repeated_augment", 3)
    first = plans(spec, n, before, batch, drop_last=False)
    start = first[0].consumed_after(1)
    done = [(k.index, k.draw) for ks in per_rank(first, steps=2) for k in ks]
    rest = [(k.index, k.draw) for ks in per_rank(plans(spec, n, after, batch, start=start, drop_last=False))
            for k in ks]
    order = ra_order(n, 3, 3, 0)
    assert Counter(done + rest) == Counter(zip(order, [p % 3 for p in range(n)]))


# --- class_balanced ----------------------------------------------------------------------------

def test_class_balanced_draws_are_torch_multinomial_seeded_by_seed_and_epoch():
    labels = imbalanced_labels()
    probs = class_balanced_probabilities(labels, ["a", "b", "c", "d"], None)
    n = len(labels)
    for world in (1, 2, 3):
        ps = plans(SamplerSpec("class_balanced", probabilities=probs), n, world, 4, seed=5, epoch=2, drop_last=False)
        check_contract(ps, 4)
        gen = torch.Generator().manual_seed(5 * 1_000_003 + 2)
        expected = torch.multinomial(probs, n, replacement=True, generator=gen).tolist()
        got = [k for ks in per_rank(ps) for k in ks]
        assert Counter(k.index for k in got) == Counter(expected)
        assert len({(k.index, k.draw) for k in got}) == n  # a sample drawn twice: two augmentations


@pytest.mark.parametrize("weights, expected", [
    (None, {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}),
    ({"a": 2.0, "d": 0.0}, {0: 0.5, 1: 0.25, 2: 0.25, 3: 0.0}),
])
def test_class_balanced_class_counts_over_many_epochs_match_the_weights(weights, expected):
    """Tolerance: 4 binomial standard deviations of the total count (seeded, so not flaky)."""
    labels = imbalanced_labels()  # class a: 50 images, b-d: 5 each
    n, epochs, world = len(labels), 200, 3
    spec = SamplerSpec("class_balanced", probabilities=class_balanced_probabilities(labels, "abcd", weights))
    counts = Counter()
    for epoch in range(epochs):
        for ks in per_rank(plans(spec, n, world, 4, epoch=epoch, drop_last=False)):
            counts.update(labels[k.index] for k in ks)
    total = n * epochs
    assert sum(counts.values()) == total
    for c, p in expected.items():
        sd = math.sqrt(total * p * (1 - p))
        assert abs(counts[c] - total * p) <= 4 * sd + 1e-9, (c, counts[c] / total, p)
    # within class a every image is drawn, about evenly
    within = Counter(k.index for e in range(20)
                     for ks in per_rank(plans(spec, n, 1, 4, epoch=e, drop_last=False)) for k in ks if labels[k.index] == 0)
    assert len(within) == 50


def test_class_balanced_resumes_on_another_world_size_with_the_rest_of_the_order():
    labels = imbalanced_labels()
    spec = SamplerSpec("class_balanced", probabilities=class_balanced_probabilities(labels, "abcd", None))
    n = len(labels)
    whole = Counter((k.index, k.draw) for ks in per_rank(plans(spec, n, 1, 4, drop_last=False)) for k in ks)
    first = plans(spec, n, 2, 4, drop_last=False)
    start = first[0].consumed_after(1)
    done = [(k.index, k.draw) for ks in per_rank(first, steps=2) for k in ks]
    rest = [(k.index, k.draw) for ks in per_rank(plans(spec, n, 3, 4, start=start, drop_last=False)) for k in ks]
    assert Counter(done + rest) == whole


def test_class_weights_that_name_no_class_or_weigh_nothing_are_refused():
    with pytest.raises(ValueError, match="names no class 'e'"):
        class_balanced_probabilities([0, 1], ["a", "b"], {"e": 1.0})
    with pytest.raises(ValueError, match="every class with images weight 0"):
        class_balanced_probabilities([0, 1], ["a", "b"], {"a": 0, "b": 0})


def test_sampler_keys_are_validated():
    cfg = config_mod.load(None, ["data.sampler=class_balanced", "data.class_weights={cat: 2, dog: 0.5}"])
    assert cfg.data.class_weights == {"cat": 2.0, "dog": 0.5}
    for bad, words in [(["data.sampler=weighted"], "choose one of plan, distributed"),
                       (["data.ra_repeats=0"], "data.ra_repeats"),
                       (["data.class_weights={cat: 2}"], "set data.sampler=class_balanced"),
                       (["data.sampler=class_balanced", "data.class_weights={cat: -1}"], "use 0 or more"),
                       (["data.sampler=class_balanced", "data.class_weights=[cat]"], "expected a mapping")]:
        with pytest.raises(ConfigError, match=words):
            config_mod.load(None, bad)


def test_the_plan_sampler_is_unchanged_by_draw_numbers():
    """The default order and seeds are those of earlier versions (checkpoints resume exactly)."""
    from ddp_trainer.data.transforms import sample_seed

    ps = plans(SamplerSpec(), 30, 2, 4, seed=9, epoch=1)
    assert all(k.draw == 0 for ks in per_rank(ps) for k in ks)
    assert sample_seed(9, 1, 5) == sample_seed(9, 1, 5, 0) != sample_seed(9, 1, 5, 1)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_strided_samplers_give_the_plans_micro_batch_sizes_for_every_size(world):
    """A strided step cuts each rank's share in rounds: the same size bounds as the plan's slots."""
    from ddp_trainer.data.samplers import min_micro_batch

    for batch in range(1, 9):
        for accum in (1, 2):
            for n in range(2 * world, 121, 3):
                for drop_last in (True, False):
                    plain = plans(SamplerSpec(), n, world, batch, accum, drop_last=drop_last)
                    ra = plans(SamplerSpec("repeated_augment", 2), n, world, batch, accum, drop_last=drop_last)
                    assert len(ra[0]) == len(plain[0])
                    lo = min_micro_batch(batch)
                    floor = lo if n >= world * lo else n // world
                    for j in range(len(plain[0])):
                        assert {p.micro_count(j) for p in ra} == {plain[0].micro_count(j)}
                        sizes = [s for p in ra for s in p.micro_sizes(j)]
                        assert min(sizes) >= floor and max(sizes) <= max(batch + 1, 2 * lo), (n, batch, j, sizes)
                        assert sum(sizes) == sum(s for p in plain for s in p.micro_sizes(j))
