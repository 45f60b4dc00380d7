"""DataLoaders of a run, and the one place that reaches into torch's private DataLoader internals.

Batches are ``(uint8 images, labels, loss weights)``; the training loader draws its micro-batches
from an :class:`~.samplers.EpochPlan` set each epoch, the evaluation loader each rank's exact share.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..config import Config, DataConfig
from ..errors import DataError
from ..launch.dist import Dist
from .datasets import (
    FolderDataset,
    Splits,
    eval_transform,
    train_transform,
    with_decoded_cache,
)
from . import device_decode
from .device_decode import DeviceDecodeDataset
from .folder_index import FolderIndex
from .samplers import EpochPlan, ExactEvalSampler, PlanBatchSampler, SamplerSpec, class_balanced_probabilities
from .shard_prefetch import prefetching
from .workers import start_method

log = logging.getLogger("ddp_trainer")


def _collate(items: list[tuple[torch.Tensor, int, float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
    weights = torch.tensor([it[2] for it in items], dtype=torch.float32)
    return images, labels, weights


def _loader_kwargs(cfg: DataConfig, device: torch.device, workers: int,
                   worker_init_fn: Callable[[int], None] | None = None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "worker_init_fn": worker_init_fn,
        "num_workers": workers,
        "pin_memory": cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda",
        "collate_fn": _collate,
        "multiprocessing_context": start_method(workers),  # explicit: see .workers
        # each pass draws its workers' base seed from this generator; without one it is drawn from
        # torch's global stream, which the model's dropout and drop path draw from too, so a resumed
        # run (a fresh iterator where the uninterrupted one kept its persistent workers) would shift
        # the model's random numbers. Augmentation never uses that seed: it comes from (seed, epoch, sample)
        "generator": torch.Generator().manual_seed(0),
    }
    if workers > 0:
        kwargs["persistent_workers"] = cfg.persistent_workers
        if cfg.prefetch_factor is not None:
            kwargs["prefetch_factor"] = cfg.prefetch_factor
    return kwargs


class LoaderOwner:
    """The run's DataLoaders, and the one place that reaches into torch's private DataLoader
    internals (``DataLoader._iterator``, ``_shutdown_workers``), for which torch has no public API.
    ``tests/test_loader_internals.py`` fails loudly when a torch upgrade changes them.

    Why: loader workers ignore the stop signals (a cluster's signal must not kill them before the
    stop checkpoint), so after an exception multiprocessing's exit-time terminate-and-join would
    wait for them forever; :meth:`close` stops them explicitly on every exit path. And workers fork
    from the training process: ``before_fork`` runs before each fork (a background checkpoint write
    must not be half-way through a lock when a worker inherits the process image).
    """

    def __init__(self, before_fork: Callable[[], None]) -> None:
        self.before_fork = before_fork
        self._loaders: list[DataLoader] = []
        self._forked: set[int] = set()  # ids of persistent-worker loaders whose workers exist
        self._live: Any = None  # the iterator of the current pass (non-persistent workers)

    def iterate(self, loader: DataLoader) -> Iterator[Any]:
        """A new pass over ``loader`` (its workers forked first where needed)."""
        if loader not in self._loaders:
            self._loaders.append(loader)
        if loader.num_workers > 0 and not (loader.persistent_workers and id(loader) in self._forked):
            self._forked.add(id(loader))
            self.before_fork()
        self._live = iter(loader)
        return self._live

    def close(self) -> None:
        """Stop every loader's workers now (idempotent)."""
        for it in [self._live] + [getattr(loader, "_iterator", None) for loader in self._loaders]:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        for loader in self._loaders:
            loader._iterator = None
        self._live = None
        self._forked.clear()


def make_train_loader(dataset: FolderDataset | DeviceDecodeDataset, cfg: DataConfig, device: torch.device,
                      workers: int | None = None, worker_init_fn: Callable[[int], None] | None = None
                      ) -> tuple[DataLoader, PlanBatchSampler]:
    batches = PlanBatchSampler()
    w = cfg.num_workers if workers is None else workers
    kwargs = _loader_kwargs(cfg, device, w, worker_init_fn)
    if isinstance(dataset, DeviceDecodeDataset):
        kwargs["collate_fn"] = device_decode.collate  # deferred JPEGs and decoded tensors in one list
    # a remote shard set's next window of shards is fetched while this one is read (.shard_prefetch)
    return DataLoader(dataset, batch_sampler=prefetching(batches, dataset, cfg.shard_window), **kwargs), batches


def make_eval_loader(dataset: FolderDataset, cfg: DataConfig, dist: Dist, device: torch.device,
                     sampler: Sampler | None = None, workers: int | None = None,
                     worker_init_fn: Callable[[int], None] | None = None) -> DataLoader:
    """Loader over this rank's exact share of ``dataset`` (``sampler`` replaces it, for tests)."""
    if sampler is None:
        sampler = ExactEvalSampler(len(dataset), dist.world_size, dist.rank)
    w = cfg.num_workers if workers is None else workers
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=prefetching(sampler, dataset, cfg.shard_window),
                      **_loader_kwargs(cfg, device, w, worker_init_fn))


MULTINOMIAL_LIMIT = 2**24  # torch.multinomial's largest number of categories


def sampler_spec(cfg: DataConfig, train: FolderIndex) -> SamplerSpec:
    """``data.sampler`` over the training index; a bad ``data.class_weights``, or ``shard_window``
    over a folder tree (which has no shards), raises DataError (on every rank alike: shared)."""
    probabilities = None
    if cfg.sampler == "class_balanced":
        if len(train) > MULTINOMIAL_LIMIT:
            raise DataError(f"data.sampler=class_balanced draws with torch.multinomial, which takes at most "
                            f"{MULTINOMIAL_LIMIT:,} samples; '{train.root}' holds {len(train):,}: use data.sampler="
                            f"plan, or train on a subset", shared=True)
        try:
            probabilities = class_balanced_probabilities(train.labels, train.classes,
                                                         cfg.class_weights)
        except ValueError as exc:
            raise DataError(f"data.class_weights {exc}; name classes of '{train.root}'", shared=True) from None
    if cfg.sampler == "repeated_augment" and cfg.ra_repeats >= max(len(train), 2):
        # each epoch draws len(train) samples: ra_repeats copies of ceil(n / ra_repeats) images
        raise DataError(f"data.ra_repeats={cfg.ra_repeats} with data.sampler=repeated_augment and {len(train):,} "
                        f"training image(s) in '{train.root}': each epoch would draw a single image over and over; "
                        f"use a small count of copies per image, e.g. data.ra_repeats=3", shared=True)
    shards = None
    if cfg.sampler == "shard_window":
        ids = getattr(train, "shard_ids", None)
        if ids is None:
            # a tree's files are read in place: windows of it would only cut the shuffle's reach
            raise DataError(f"data.sampler=shard_window reads a shard set a few shards at a time; '{train.root}' is a "
                            f"folder tree, which has no shards: use data.sampler=plan on it (any sampler reads a tree "
                            f"or a local shard set at random cheaply), or make a shard set with 'ddp-trainer shard'",
                            shared=True)
        shards = torch.from_numpy(np.array(ids, dtype=np.int64))  # a copy: the index's arrays are read-only
    return SamplerSpec(cfg.sampler, cfg.ra_repeats, probabilities, shards, cfg.shard_window)


@dataclass
class RunData:
    """A training run's datasets and loaders, built once (persistent workers live across epochs)."""

    splits: Splits
    train_set: FolderDataset
    val_set: FolderDataset
    owner: LoaderOwner
    train_loader: DataLoader
    batches: PlanBatchSampler
    val_loader: DataLoader
    sampler: SamplerSpec  # data.sampler: which draws make each epoch's order
    # data.decode_device=cuda: the training batches' JPEGs decoded on this device (None: in the workers)
    decode_on: torch.device | None = None

    def train_batches(self, plan: EpochPlan) -> Iterator[Any]:
        """A pass over ``plan``'s micro-batches."""
        self.batches.set_plan(plan)
        batches = self.owner.iterate(self.train_loader)
        if self.decode_on is None:
            return batches
        return device_decode.device_batches(batches, self.train_set.transform,
                                            device_decode.jpeg_batch_decoder(self.decode_on), self.decode_on)

    def val_batches(self) -> Iterator[Any]:
        return self.owner.iterate(self.val_loader)

    def close(self) -> None:
        """Stop every loader's workers now."""
        self.owner.close()


def build_run_data(cfg: Config, dist: Dist, splits: Splits, sampler: SamplerSpec, *,
                   worker_init_fn: Callable[[int], None], before_fork: Callable[[], None]) -> RunData:
    """The datasets (over this node's decoded caches with ``data.cache=decoded``: built first when
    missing) and their loaders. ``before_fork`` runs before loader workers fork (see LoaderOwner)."""
    d = cfg.data
    # the cache build's workers get the training loaders' set-up (they ignore the stop signals too)
    train_cache = with_decoded_cache(splits.train, d, dist, d.train_cache_size, worker_init_fn=worker_init_fn)
    train_set = FolderDataset(splits.train, train_transform(d), cfg.seed, train_cache, d.max_image_pixels,
                              d.reduced_decode)
    val_cache = with_decoded_cache(splits.val, d, dist, d.image_size, d.val_resize, worker_init_fn=worker_init_fn)
    val_set = FolderDataset(splits.val, eval_transform(d, cached=val_cache is not None), cfg.seed, val_cache,
                            d.max_image_pixels)
    decode_on = None
    if d.decode_device == "cuda":  # the cache holds pixels already: nothing is left to decode there
        device_decode.check_decode_device(d.decode_device, dist.device)
        decode_on = dist.device if train_cache is None else None
        if decode_on is not None and dist.is_main:
            log.info("data.decode_device=cuda: the training set's still JPEGs decode on %s a batch at a time; an exact "
                     "resume rests on the GPU decode and resize being deterministic (scripts/gpu_check.sh's "
                     "decode_device says whether they are on this machine)", decode_on)
    loaded = train_set if decode_on is None else device_decode.DeviceDecodeDataset(train_set)
    train_loader, batches = make_train_loader(loaded, d, dist.device, worker_init_fn=worker_init_fn)
    val_loader = make_eval_loader(val_set, d, dist, dist.device, worker_init_fn=worker_init_fn)
    return RunData(splits, train_set, val_set, LoaderOwner(before_fork), train_loader, batches, val_loader,
                   sampler, decode_on)
