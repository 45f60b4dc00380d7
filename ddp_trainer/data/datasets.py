"""Datasets and loaders: from ``data.*`` config to the train/val indexes and DataLoaders.

Rank 0 scans the folders once and broadcasts the index; the demo data is written by local rank 0
of each node while the others wait. The datasets return uint8 images; normalisation happens on the
training device.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from . import demo as demo_data
from ..config import Config, DataConfig
from ..launch.dist import Dist
from ..errors import DataError, show_path
from .folder_index import FolderIndex, check_same_classes, scan, split_holdout
from ..progress import Ticker
from .samplers import ExactEvalSampler, PlanBatchSampler, SampleKey
from .transforms import ImageTransform, load_rgb, sample_seed

log = logging.getLogger("ddp_trainer")
RECORD_ENV = "DDP_TRAINER_TEST_RECORD_SAMPLES"  # test hook: a folder to log "epoch index" per loaded sample


class FolderDataset(Dataset):
    """Images of a :class:`FolderIndex`; items are ``(uint8 CHW image, label, loss weight)``.

    Indexed by :class:`SampleKey` (the sample's randomness comes from ``seed``, the key's epoch and
    index) or by a plain int (no augmentation randomness, weight 1).
    """

    def __init__(self, index: FolderIndex, transform: ImageTransform, seed: int = 0,
                 cached: Any = None) -> None:
        self.index = index
        self.transform = transform
        self.seed = seed
        self.cached = cached  # decoded_cache.CachedImages, or None: decode the files
        self.record_dir = os.environ.get(RECORD_ENV)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: SampleKey | int) -> tuple[torch.Tensor, int, float]:
        if isinstance(key, SampleKey):
            i, epoch, weight = key
        else:
            i, epoch, weight = int(key), 0, 1.0
        img = self.cached[i] if self.cached is not None else load_rgb(self.index.path(i))
        if self.record_dir and weight > 0 and isinstance(key, SampleKey):
            with open(os.path.join(self.record_dir, f"samples-{os.getpid()}.txt"), "a") as f:
                f.write(f"{epoch} {i}\n")
        gen = None
        if self.transform.random:
            gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, i))
        return self.transform(img, gen), self.index.samples[i][1], weight


@dataclass(frozen=True)
class Splits:
    train: FolderIndex
    val: FolderIndex
    source: str  # human-readable description of where val came from

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    @property
    def class_to_idx(self) -> dict[str, int]:
        return self.train.class_to_idx


def resolve_root(cfg: DataConfig, dist: Dist) -> Path:
    """The data root; for ``demo``, writes the demo data on local rank 0 of each node first."""
    if cfg.root != "demo":
        return Path(cfg.root).expanduser()
    if dist.env.is_local_main:
        root = demo_data.ensure_demo_data()
    with dist.waiting("local rank 0 to write the demo data"):
        dist.barrier()  # the node's other ranks wait until local rank 0 has written it
    if not dist.env.is_local_main:
        root = demo_data.demo_dir()
    return root


def scan_splits(cfg: DataConfig, root: Path) -> Splits:
    """Index train (and val, or a held-out part of train). Runs on rank 0 only."""
    train = scan(root / cfg.train_dir, cfg.classes)
    val_folder = root / cfg.val_dir
    if val_folder.is_dir() and cfg.val_dir != cfg.train_dir:
        val = scan(val_folder, cfg.classes)
        check_same_classes(train, val, str(val_folder))
        return Splits(train, val, f"'{val_folder}'")
    if cfg.val_fraction <= 0:
        raise DataError(f"no val folder '{val_folder}' and data.val_fraction is 0; add a val/ folder "
                        f"or set data.val_fraction (for example 0.1)")
    train, val = split_holdout(train, cfg.val_fraction)
    if len(val) == 0:
        raise DataError(f"data.val_fraction={cfg.val_fraction} holds out no image of '{root / cfg.train_dir}'; "
                        f"raise it or add a val/ folder")
    return Splits(train, val, f"{cfg.val_fraction:.0%} of '{root / cfg.train_dir}' (no '{val_folder}')")


def _unreadable(index: FolderIndex, dist: Dist) -> set[str]:
    """Relative paths of files that do not decode; each rank checks a strided share."""
    bad = []
    ticker = Ticker(f"data.bad_images=skip: checking {index.root}", total=len(index), scale=dist.world_size)
    for i in range(dist.rank, len(index), dist.world_size):
        try:
            load_rgb(index.path(i))
        except DataError:
            bad.append(index.samples[i][0])
        ticker.tick()
    with dist.waiting("every rank to check its share of the images (data.bad_images=skip)"):
        return {p for part in dist.all_gather_object(bad) for p in part}


def _drop_unreadable(index: FolderIndex, dist: Dist, split: str) -> FolderIndex:
    bad = _unreadable(index, dist)
    if bad:
        shown = ", ".join(show_path(b) for b in sorted(bad)[:3]) + (" ..." if len(bad) > 3 else "")
        log.warning("data.bad_images=skip: skipped %d unreadable %s image(s) under %s: %s",
                    len(bad), split, index.root, shown)
        index = index.without(bad)
        if not index.samples:
            raise DataError(f"every {split} image under '{index.root}' is unreadable; check the files")
        empty = [c for k, c in enumerate(index.classes) if not any(lbl == k for _, lbl in index.samples)]
        if empty:
            raise DataError(f"class {empty[0]!r} has no readable {split} image under '{index.root}'; "
                            f"replace its files or remove the class")
    return index


def build_splits(cfg: Config, dist: Dist) -> Splits:
    """Scan once on rank 0, broadcast, and (with ``bad_images=skip``) drop unreadable files."""
    root = resolve_root(cfg.data, dist)
    with dist.waiting("rank 0 to scan the data folders"):
        splits = dist.main_then_broadcast(lambda: scan_splits(cfg.data, root))
    if cfg.data.bad_images == "skip":
        splits = Splits(_drop_unreadable(splits.train, dist, "train"),
                        _drop_unreadable(splits.val, dist, "val"), splits.source)
    return splits


def with_decoded_cache(index: FolderIndex, cfg: DataConfig, dist: Dist, size: int,
                       resize: int | None = None) -> Any:
    """For ``data.cache: decoded``: this node's cache of ``index`` at ``size`` (shorter side first
    resized to ``resize``, then centre-cropped; built first if missing, by every local rank) as a
    CachedImages; else None."""
    if cfg.cache != "decoded":
        return None
    from . import decoded_cache
    from .demo import cache_root

    folder = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "decoded"
    path = decoded_cache.ensure(index, size, folder, dist, workers=cfg.num_workers, resize=resize,
                                interpolation=cfg.interpolation)
    return decoded_cache.CachedImages(path, len(index), size)


def train_transform(cfg: DataConfig) -> ImageTransform:
    erase = tuple(max(0, min(255, round(255 * m))) for m in cfg.mean)
    return ImageTransform(cfg.image_size, tuple(cfg.augment), tuple(cfg.rrc_scale), tuple(cfg.rrc_ratio),
                          interpolation=cfg.interpolation, erasing_p=cfg.random_erasing_p,
                          erase_value=erase)  # type: ignore[arg-type]


def eval_transform(cfg: DataConfig, cached: bool = False) -> ImageTransform:
    """Validation geometry (``data.val_crop_pct``); ``cached``: the decoded cache stores it already,
    so the transform leaves the stored squares as they are."""
    if cached:
        return ImageTransform(cfg.image_size)
    return ImageTransform(cfg.image_size, (), resize=cfg.val_resize, interpolation=cfg.interpolation)


def _collate(items: list[tuple[torch.Tensor, int, float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
    weights = torch.tensor([it[2] for it in items], dtype=torch.float32)
    return images, labels, weights


def _loader_kwargs(cfg: DataConfig, device: torch.device, workers: int,
                   worker_init_fn: Any = None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "worker_init_fn": worker_init_fn,
        "num_workers": workers,
        "pin_memory": cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda",
        "collate_fn": _collate,
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


def make_train_loader(dataset: FolderDataset, cfg: DataConfig, device: torch.device,
                      workers: int | None = None, worker_init_fn: Any = None) -> tuple[DataLoader, PlanBatchSampler]:
    batches = PlanBatchSampler()
    w = cfg.num_workers if workers is None else workers
    return DataLoader(dataset, batch_sampler=batches, **_loader_kwargs(cfg, device, w, worker_init_fn)), batches


def make_eval_loader(dataset: FolderDataset, cfg: DataConfig, dist: Dist, device: torch.device,
                     sampler: Any = None, workers: int | None = None, worker_init_fn: Any = None) -> DataLoader:
    """Loader over this rank's exact share of ``dataset`` (``sampler`` replaces it, for tests)."""
    if sampler is None:
        sampler = ExactEvalSampler(len(dataset), dist.world_size, dist.rank)
    w = cfg.num_workers if workers is None else workers
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                      **_loader_kwargs(cfg, device, w, worker_init_fn))
