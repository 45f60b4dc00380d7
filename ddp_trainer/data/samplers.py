"""Which samples each rank loads, per optimizer step, so that training can resume mid-epoch.

An epoch's *order* is a sequence of draws from the training set seeded by ``(seed, epoch)``, made
by the run's sampler (``data.sampler``, a :class:`SamplerSpec`):

- ``plan``: a permutation of the training set.
- ``distributed``: ``torch.utils.data.DistributedSampler``'s order: its permutation, padded with its
  first samples so that every rank gets as many; rank ``r`` trains exactly what the sampler yields
  on rank ``r``. The padding depends on the world size.
- ``repeated_augment``: a permutation with each sample repeated ``repeats`` times in a row, cut at
  the training set's length; rank ``r`` takes positions ``r, r + world, ...`` of each step, so the
  copies of a sample go to different ranks (torchvision's ``RASampler``, timm's ``--aug-repeats``).
- ``class_balanced``: draws with replacement, each sample with probability proportional to its
  class weight / its class's count (every class equally likely by default).
- ``shard_window``: every sample once, read a few shards at a time (a shard set in object storage,
  where a shard is fetched whole): the shards in a shuffled order are cut into ``world`` runs of
  consecutive samples, one per rank; within its run, a rank's samples are shuffled within windows
  of ``window`` consecutive shards, and rank ``r`` takes positions ``r, r + world, ...`` of the
  order, so it reads its own run window by window. The order depends on the world size (a resume
  on another one restarts the epoch, as ``distributed``'s does); see :func:`shard_window_order`.

Steps take consecutive slices of the order, so after any optimizer step the consumed draws are
exactly a prefix of it: a checkpoint records its length (``consumed``), and a resumed run - with any
number of processes, except for ``distributed``, whose order depends on it - plans the rest of the
order without loading the skipped samples. A draw that repeats a sample within an epoch carries its
own ``draw`` number, so each copy gets its own augmentation.

A full optimizer step takes ``world * batch * accum`` draws: ``accum`` rounds, and in each round
every rank gets ``batch`` draws (contiguous ones with ``plan`` and ``class_balanced``; with the
strided samplers, every ``world``-th draw of the step). What happens to the epoch's *tail* (the
draws after the last full step) depends on ``drop_last``:

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

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import DistributedSampler

SAMPLERS = ("plan", "distributed", "repeated_augment", "class_balanced", "shard_window")
STRIDED = ("distributed", "repeated_augment", "shard_window")  # rank r takes every world-th draw of a step


class SampleKey(NamedTuple):
    """What a sampler hands to the dataset: the sample, the epoch and draw (for its randomness), its
    loss weight. ``draw`` tells apart the copies of a sample drawn more than once in an epoch (0 for
    the first, or only, one)."""

    index: int
    epoch: int
    weight: float
    draw: int = 0


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The global training order of ``epoch``: the same on every rank, node and world size."""
    return _order_tensor(n, seed, epoch).tolist()


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (1 << 63))


def _order_tensor(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=_generator(seed, epoch))


@dataclass(frozen=True)
class SamplerSpec:
    """``data.sampler`` and its parameters, built once per run.

    ``probabilities`` (``class_balanced`` only): each sample's chance to be drawn, from
    :func:`class_balanced_probabilities`. ``shards`` (``shard_window`` only): each sample's shard
    number; ``window``: data.shard_window.
    """

    kind: str = "plan"
    repeats: int = 3  # repeated_augment: data.ra_repeats
    probabilities: torch.Tensor | None = None
    shards: torch.Tensor | None = None
    window: int = 4

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.kind!r}")
        if self.kind == "class_balanced" and self.probabilities is None:
            raise ValueError("class_balanced needs the samples' probabilities")
        if self.kind == "shard_window" and (self.shards is None or self.window < 1):
            raise ValueError("shard_window needs each sample's shard and a window of 1 or more")

    @property
    def strided(self) -> bool:
        return self.kind in STRIDED

    def epoch_size(self, n: int, world: int) -> int:
        """Draws in one epoch over ``n`` samples: ``n``, except ``distributed``'s padded length."""
        return math.ceil(n / world) * world if self.kind == "distributed" else n

    def identity(self, world: int) -> dict[str, object]:
        """What a mid-epoch position depends on besides the training set (kept in checkpoints)."""
        out: dict[str, object] = {"sampler": self.kind}
        if self.kind == "repeated_augment":
            out["repeats"] = self.repeats
        elif self.kind == "distributed":
            out["world_size"] = world
        elif self.kind == "class_balanced":
            out["probabilities_sha256"] = probabilities_digest(self.probabilities)
        elif self.kind == "shard_window":
            assert self.shards is not None
            out["world_size"] = world
            out["window"] = self.window
            # the same samples cut into other shards (another --shard-size) give another order
            out["shards_sha256"] = hashlib.sha256(self.shards.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
        return out


def probabilities_digest(p: torch.Tensor | None) -> str:
    """A SHA-256 of the exact per-sample draw probabilities, in sample order: what
    ``torch.multinomial`` draws an epoch from, so any change of the class weights (a swap of two
    classes' weights included), the labels or their order gives another digest."""
    assert p is not None
    # float32 bytes, as drawn from; contiguous so that a view of a larger tensor hashes alike
    return hashlib.sha256(p.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def class_balanced_probabilities(labels: Sequence[int], classes: Sequence[str],
                                 class_weights: dict[str, float] | None) -> torch.Tensor:
    """Each sample's draw probability: its class's weight (``class_weights[name]``, default 1)
    divided by the class's count, normalised. Raises ValueError naming a bad class or weight."""
    lab = torch.tensor(labels, dtype=torch.int64)
    counts = torch.bincount(lab, minlength=len(classes)).double()
    weights = torch.ones(len(classes), dtype=torch.float64)
    for name, w in (class_weights or {}).items():
        if name not in classes:
            raise ValueError(f"names no class {name!r} of the training set (classes: "
                             f"{', '.join(classes[:8])}{' ...' if len(classes) > 8 else ''})")
        weights[list(classes).index(name)] = float(w)
    drawable = (weights > 0) & (counts > 0)
    if not bool(drawable.any()):
        raise ValueError("gives every class with images weight 0; give at least one a positive weight")
    per_sample = (weights / counts.clamp(min=1))[lab]
    return (per_sample / per_sample.sum()).float()


def shard_window_order(shards: torch.Tensor, seed: int, epoch: int, world: int, window: int) -> torch.Tensor:
    """The epoch's order of ``data.sampler=shard_window`` over samples whose shard numbers are
    ``shards`` (any integers; a shard's samples need not be contiguous), a pure function of the
    arguments. Every sample appears once. The order is built from one generator seeded by
    ``(seed, epoch)``:

    1. the shards are put in a random order, each shard's samples in index order: a sequence Q;
    2. Q is cut into ``world`` consecutive runs, run ``r`` as long as rank ``r``'s share of the
       positions (``r, r + world, ...`` below ``n``); at most ``world - 1`` shards are split between
       two runs;
    3. within each run, the samples of each ``window`` consecutive shards (counted from the run's
       start) are shuffled together;
    4. position ``k * world + r`` of the order is the ``k``-th sample of run ``r``.

    So rank ``r`` reads its run in order: about ``n / world`` samples from about ``shards / world``
    shards, ``window`` of them at a time."""
    n = len(shards)
    gen = _generator(seed, epoch)
    _, compact = torch.unique(shards.to(torch.int64), return_inverse=True)
    count = int(compact.max()) + 1 if n else 0
    place = torch.empty(count, dtype=torch.int64)
    place[torch.randperm(count, generator=gen)] = torch.arange(count)
    q = torch.argsort(place[compact] * n + torch.arange(n), stable=True)  # the shuffled shards' samples
    order = torch.empty(n, dtype=torch.int64)
    begin = 0
    for r in range(world):
        size = len(range(r, n, world))
        run = q[begin:begin + size]
        begin += size
        if not size:
            continue
        shard = compact[run]
        # the run's k-th shard (0, 1, ...), counted where the shard number changes
        nth = torch.cumsum(torch.cat([torch.ones(1, dtype=torch.int64), (shard[1:] != shard[:-1]).long()]), 0) - 1
        keys = (nth // window) * size + torch.randperm(size, generator=gen)
        order[r::world] = run[torch.argsort(keys)]
    return order


class EpochDraws(NamedTuple):
    """The part of one epoch's order a rank reads, from the plan's start: ``ids`` (sample indices)
    and ``draws`` (their draw numbers; None: all 0). With a strided sampler, ``ids`` is this rank's
    stream (positions ``start + rank, start + rank + world, ...``); else the whole order from
    ``start``."""

    ids: torch.Tensor
    draws: torch.Tensor | None


def epoch_draws(spec: SamplerSpec, n: int, *, seed: int, epoch: int, world: int, rank: int,
                start: int) -> EpochDraws:
    """The order of ``epoch`` as this rank reads it (see :class:`EpochDraws`)."""
    if spec.kind == "plan":
        return EpochDraws(_order_tensor(n, seed, epoch)[start:], None)
    if spec.kind == "class_balanced":
        assert spec.probabilities is not None
        ids = torch.multinomial(spec.probabilities, n, replacement=True, generator=_generator(seed, epoch))
        return EpochDraws(ids[start:], torch.arange(start, n))  # every position its own augmentation
    if spec.kind == "repeated_augment":
        distinct = math.ceil(n / spec.repeats)
        order = _order_tensor(n, seed, epoch)[:distinct].repeat_interleave(spec.repeats)[:n]
        positions = torch.arange(start + rank, n, world)
        return EpochDraws(order[positions], positions % spec.repeats)
    if spec.kind == "shard_window":
        assert spec.shards is not None
        order = shard_window_order(spec.shards, seed, epoch, world, spec.window)
        return EpochDraws(order[torch.arange(start + rank, n, world)], None)
    # distributed: torch's sampler itself, over this rank's shard
    if start % world:
        raise ValueError(f"a distributed-sampler position ({start}) must be a multiple of the world size ({world})")
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    stream = torch.tensor(list(sampler), dtype=torch.int64)[start // world:]
    positions = torch.arange(start // world, start // world + len(stream)) * world + rank
    return EpochDraws(stream, (positions >= n).long())  # the padding repeats samples: a second draw


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

    ``n`` is the training set's size; the epoch has ``size`` draws (``sampler.epoch_size``).
    ``start`` draws of the epoch's order were consumed before (a mid-epoch resume); ``max_steps``
    caps the steps (debug runs, tests). ``dropped`` counts the tail draws this plan leaves out;
    ``partial_only`` is True when the one step of the plan is a partial step kept because the
    training set is smaller than one global batch; ``padded`` counts the draws that only even out
    the shards (``distributed``).
    """

    def __init__(self, n: int, *, world: int, rank: int, batch_size: int, accum: int, seed: int,
                 epoch: int, start: int = 0, drop_last: bool = True, max_steps: int | None = None,
                 sampler: SamplerSpec | None = None) -> None:
        spec = sampler if sampler is not None else SamplerSpec()
        size = spec.epoch_size(n, world)
        if not 0 <= start <= size:
            raise ValueError(f"start {start} outside epoch of {size} draws")
        self.epoch = epoch
        self.start = start
        self.n = n
        self.size = size
        self.padded = size - n
        self.sampler = spec
        self.world = world
        self.rank = rank
        self.batch_size = batch_size
        self.min_micro = min_micro_batch(batch_size)
        self._draws = epoch_draws(spec, n, seed=seed, epoch=epoch, world=world, rank=rank, start=start)
        rest = size - start
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
        """Global draws of the epoch consumed once step ``j`` is done."""
        lay = self._layouts[j]
        return self.start + lay.begin + lay.size

    def micro_sizes(self, j: int) -> list[int]:
        """This rank's micro-batch sizes in step ``j``."""
        return [stop - begin for begin, stop in self._bounds(j)]

    def _bounds(self, j: int) -> list[tuple[int, int]]:
        """This rank's micro-batches of step ``j`` as ranges of ``self._draws.ids``."""
        lay = self._layouts[j]
        if self.sampler.strided:
            # this rank's draws of the step: positions begin + rank, + world, ... (begin is a
            # multiple of world: full steps are), i.e. a contiguous run of its stream, cut in rounds
            count = (lay.size - self.rank + self.world - 1) // self.world
            first = lay.begin // self.world
            base, extra = divmod(count, lay.rounds)
            out, begin = [], first
            for m in range(lay.rounds):
                stop = begin + base + (1 if m < extra else 0)
                out.append((begin, stop))
                begin = stop
            return out
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
        ids, draws = self._draws
        if draws is None:
            return [[SampleKey(i, self.epoch, weight) for i in ids[b:e].tolist()] for b, e in self._bounds(j)]
        return [[SampleKey(i, self.epoch, weight, d) for i, d in zip(ids[b:e].tolist(), draws[b:e].tolist())]
                for b, e in self._bounds(j)]

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
