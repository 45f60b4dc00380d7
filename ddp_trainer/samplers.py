"""Which samples each rank loads, per optimizer step, so that training can resume mid-epoch.

An epoch's *global order* is a permutation of the training set seeded by ``(seed, epoch)``. Steps take
consecutive slices of it, so after any optimizer step the consumed samples are exactly a prefix of
the order: a checkpoint records its length (``consumed``), and a resumed run - with any number of
processes - plans the rest of the order without loading the skipped samples.

Each optimizer step takes ``world * batch * accum`` samples (the last one fewer); each of its
micro-batches is split across ranks into contiguous parts whose sizes differ by at most one. Every
sample carries a loss weight of ``world / samples in the step``, so that DDP's gradient average is
exactly the mean over the step's samples, even for the short last step. When a micro-batch has fewer
samples than ranks, a rank without one gets a repeated sample with weight 0 (it must still join the
gradient all-reduce).
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import torch


class SampleKey(NamedTuple):
    """What a sampler hands to the dataset: the sample, the epoch (for its randomness), its weight."""

    index: int
    epoch: int
    weight: float


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The global training order of ``epoch``: the same on every rank, node and world size."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (1 << 63))
    return torch.randperm(n, generator=gen).tolist()


def rank_part(items: Sequence[int], world: int, rank: int) -> Sequence[int]:
    """Rank ``rank``'s contiguous share of ``items`` (sizes differ by at most one, larger first)."""
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    return items[start: start + base + (1 if rank < extra else 0)]


class EpochPlan:
    """This rank's micro-batches for the rest of one epoch, grouped by optimizer step."""

    def __init__(self, n: int, *, world: int, rank: int, batch_size: int, accum: int, seed: int,
                 epoch: int, start: int = 0) -> None:
        if not 0 <= start <= n:
            raise ValueError(f"start {start} outside epoch of {n} samples")
        self.epoch = epoch
        self.start = start
        self.n = n
        order = epoch_order(n, seed, epoch)[start:]
        micro = world * batch_size
        per_step = micro * accum
        self.steps: list[list[list[SampleKey]]] = []
        self.consumed_after: list[int] = []  # global samples consumed once step j is done
        for s in range(0, len(order), per_step):
            chunk = order[s: s + per_step]
            weight = world / len(chunk)
            step = []
            for m in range(0, len(chunk), micro):
                group = chunk[m: m + micro]
                part = rank_part(group, world, rank)
                if part:
                    step.append([SampleKey(i, epoch, weight) for i in part])
                else:
                    step.append([SampleKey(group[0], epoch, 0.0)])
            self.steps.append(step)
            self.consumed_after.append(start + s + len(chunk))

    def __len__(self) -> int:
        """Optimizer steps left in the epoch."""
        return len(self.steps)

    def micro_batches(self) -> Iterator[list[SampleKey]]:
        for step in self.steps:
            yield from step


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
        return sum(len(step) for step in self.plan.steps)


class ExactEvalSampler:
    """Rank ``r`` gets samples ``r, r + world, ...``: every sample exactly once, no padding."""

    def __init__(self, n: int, world: int, rank: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
