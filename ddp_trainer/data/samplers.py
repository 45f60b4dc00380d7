"""Which samples each rank loads, per optimizer step, so that training can resume mid-epoch.

An epoch's *global order* is a permutation of the training set seeded by ``(seed, epoch)``. Steps take
consecutive slices of it, so after any optimizer step the consumed samples are exactly a prefix of
the order: a checkpoint records its length (``consumed``), and a resumed run - with any number of
processes - plans the rest of the order without loading the skipped samples.

A full optimizer step takes ``world * batch * accum`` samples: ``accum`` rounds, and in each round
every rank gets ``batch`` contiguous samples. What happens to the epoch's *tail* (the samples after
the last full step) depends on ``drop_last``:

- ``drop_last=True``: the tail is left out (a different tail every epoch, since the order changes).
  Only when the rest of the epoch is shorter than one full step from the epoch's start (a training
  set smaller than one global batch) is it trained as one partial step.
- ``drop_last=False``: the tail is folded into the last step, which then has more rounds; its
  samples are spread as evenly as possible over ``rounds x world`` micro-batches.

Either way no rank ever gets a micro-batch smaller than :func:`min_micro_batch` (a 1-sample batch
crashes BatchNorm in training mode, a tiny one poisons its running statistics), unless the whole
step holds fewer samples than that for every rank, and every rank runs the same number of
micro-batches in each step (each must join the gradient all-reduce). Every sample carries a loss
weight of ``world / samples in the step``, so that DDP's gradient average is exactly the mean over
the step's samples.

Nothing per sample is built for the whole epoch: the order is one integer tensor and a step's
micro-batches are sliced from it when asked for.
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import torch


class SampleKey(NamedTuple):
    """What a sampler hands to the dataset: the sample, the epoch (for its randomness), its weight."""

    index: int
    epoch: int
    weight: float


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The global training order of ``epoch``: the same on every rank, node and world size."""
    return _order_tensor(n, seed, epoch).tolist()


def _order_tensor(n: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (1 << 63))
    return torch.randperm(n, generator=gen)


def min_micro_batch(batch_size: int) -> int:
    """The smallest micro-batch a rank is given: half of ``batch_size`` rounded up, at least 2
    (``batch_size=1`` is the one exception: then 1, which only models without BatchNorm accept)."""
    return 1 if batch_size == 1 else max(2, math.ceil(batch_size / 2))


class _Layout(NamedTuple):
    """One optimizer step: ``size`` samples from ``begin`` (relative to the plan's slice of the
    order), spread over ``rounds x world`` micro-batches."""

    begin: int
    size: int
    rounds: int


class EpochPlan:
    """This rank's micro-batches for the rest of one epoch, grouped by optimizer step.

    ``start`` samples of the epoch's order were consumed before (a mid-epoch resume); ``max_steps``
    caps the steps (debug runs, tests). ``dropped`` counts the tail samples this plan leaves out;
    ``partial_only`` is True when the one step of the plan is a partial step kept because the
    training set is smaller than one global batch.
    """

    def __init__(self, n: int, *, world: int, rank: int, batch_size: int, accum: int, seed: int,
                 epoch: int, start: int = 0, drop_last: bool = True, max_steps: int | None = None) -> None:
        if not 0 <= start <= n:
            raise ValueError(f"start {start} outside epoch of {n} samples")
        self.epoch = epoch
        self.start = start
        self.n = n
        self.world = world
        self.rank = rank
        self.batch_size = batch_size
        self.min_micro = min_micro_batch(batch_size)
        self._order = _order_tensor(n, seed, epoch)[start:]
        rest = n - start
        full_step = world * batch_size * accum
        full, tail = divmod(rest, full_step)
        self.partial_only = False
        layouts = [_Layout(j * full_step, full_step, accum) for j in range(full)]
        if tail:
            if drop_last and not (full == 0 and start == 0):
                pass  # left out
            elif layouts:
                last = layouts.pop()
                layouts.append(self._layout(last.begin, last.size + tail))
            elif tail >= world * min(self.min_micro, 2):
                layouts.append(self._layout(0, tail))
                self.partial_only = drop_last
            # else: fewer samples than ranks x 2 are left (a resume on more processes); no step can
            # give every rank a micro-batch that BatchNorm accepts, so they are left out.
        self.dropped = rest - sum(lay.size for lay in layouts)
        self._layouts = layouts[:max_steps] if max_steps is not None else layouts

    def _layout(self, begin: int, size: int) -> _Layout:
        """The fewest rounds that keep micro-batches within ``batch_size``, or, where the minimum
        size forbids that, the most rounds that keep them at or above it (then a micro-batch holds
        at most ``max(batch_size + 1, 2 x min_micro)`` samples)."""
        lo = min(self.min_micro, size // self.world)
        rounds = math.ceil(size / (self.world * self.batch_size))
        if rounds * self.world * lo > size:
            rounds = size // (self.world * lo)
        return _Layout(begin, size, rounds)

    def __len__(self) -> int:
        """Optimizer steps left in the epoch."""
        return len(self._layouts)

    def micro_count(self, j: int) -> int:
        """Micro-batches (rounds) of step ``j``: the same on every rank."""
        return self._layouts[j].rounds

    def consumed_after(self, j: int) -> int:
        """Global samples of the epoch consumed once step ``j`` is done."""
        lay = self._layouts[j]
        return self.start + lay.begin + lay.size

    def micro_sizes(self, j: int) -> list[int]:
        """This rank's micro-batch sizes in step ``j``."""
        return [stop - begin for begin, stop in self._bounds(j)]

    def _bounds(self, j: int) -> list[tuple[int, int]]:
        lay = self._layouts[j]
        slots = lay.rounds * self.world
        base, extra = divmod(lay.size, slots)
        out = []
        for m in range(lay.rounds):
            s = m * self.world + self.rank  # round-major: each round is a contiguous group of the order
            begin = lay.begin + s * base + min(s, extra)
            out.append((begin, begin + base + (1 if s < extra else 0)))
        return out

    def step(self, j: int) -> list[list[SampleKey]]:
        """This rank's micro-batches of step ``j``."""
        weight = self.world / self._layouts[j].size
        return [[SampleKey(i, self.epoch, weight) for i in self._order[b:e].tolist()] for b, e in self._bounds(j)]

    def micro_batches(self) -> Iterator[list[SampleKey]]:
        for j in range(len(self)):
            yield from self.step(j)


class PlanBatchSampler:
    """A DataLoader ``batch_sampler`` that yields the current plan's micro-batches.

    The loader (and its persistent workers) is built once; each epoch calls :meth:`set_plan`.
    """

    def __init__(self) -> None:
        self.plan: EpochPlan | None = None

    def set_plan(self, plan: EpochPlan) -> None:
        self.plan = plan

    def __iter__(self) -> Iterator[list[SampleKey]]:
        assert self.plan is not None, "set_plan() before iterating"
        return self.plan.micro_batches()

    def __len__(self) -> int:
        assert self.plan is not None
        return sum(self.plan.micro_count(j) for j in range(len(self.plan)))


class ExactEvalSampler:
    """Rank ``r`` gets samples ``r, r + world, ...``: every sample exactly once, no padding."""

    def __init__(self, n: int, world: int, rank: int) -> None:
        self.indices = range(rank, n, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
