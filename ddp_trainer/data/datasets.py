"""Datasets and loaders: from ``data.*`` config to the train/val indexes and DataLoaders.

Rank 0 scans the folders once and broadcasts the index; the demo data is written by local rank 0
of each node while the others wait. The datasets return uint8 images; normalisation happens on the
training device.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from ..config import Config, DataConfig
from ..errors import DataError, show_path
from ..launch.dist import Dist
from ..progress import Ticker
from . import decoded_cache, demo
from .decoded_cache import CachedImages
from .folder_index import FolderIndex, check_same_classes, scan, split_holdout
from .decode import MAX_IMAGE_PIXELS, decode_rgb, decode_rgb_cropped
from .samplers import SampleKey
from .shard_format import index_name
from .shard_set import ShardIndex, has_split
from .shard_store import is_url, open_store
from .transforms import ImageTransform, sample_seed

log = logging.getLogger("ddp_trainer")


class FolderDataset(Dataset):
    """Images of a :class:`FolderIndex`; items are ``(uint8 CHW image, label, loss weight)``.

    Indexed by :class:`SampleKey` (the sample's randomness comes from ``seed``, the key's epoch,
    index and draw) or by a plain int (no augmentation randomness, weight 1).
    """

    def __init__(self, index: FolderIndex, transform: ImageTransform, seed: int = 0,
                 cached: CachedImages | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                 reduced_decode: bool = False) -> None:
        self.index = index
        self.transform = transform
        self.seed = seed
        self.max_pixels = max_pixels  # data.max_image_pixels
        self.cached = cached  # None: decode the files
        self.reduced_decode = reduced_decode  # data.reduced_decode: crop while decoding JPEG files

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: SampleKey | int) -> tuple[torch.Tensor, int, float]:
        if isinstance(key, SampleKey):
            i, epoch, weight, draw = key
        else:
            i, epoch, weight, draw = int(key), 0, 1.0, 0
        gen = None
        if self.transform.random:
            gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, i, draw))
        t = self.transform
        if self.cached is None and self.reduced_decode and gen is not None and t.crops_randomly:
            img = decode_rgb_cropped(self.index.read(i), self.index.name(i), self.max_pixels,
                                     lambda h, w: t.crop_box(h, w, gen), t.size, t.mode)
            return t(img, gen, cropped=True), self.index.label(i), weight
        img = self.cached[i] if self.cached is not None else decode_rgb(self.index.read(i), self.index.name(i),
                                                                        self.max_pixels)
        return t(img, gen), self.index.label(i), weight


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
    """The data root; for ``demo``, writes the demo data on local rank 0 of each node first. A URL
    (a shard set in object storage) stays as written: ``scan_splits`` reads ``cfg.root`` for it."""
    if cfg.root != "demo":
        return Path(cfg.root) if is_url(cfg.root) else Path(cfg.root).expanduser()
    if dist.env.is_local_main:
        root = demo.ensure_demo_data()
    with dist.waiting("local rank 0 to write the demo data"):
        dist.barrier()  # the node's other ranks wait until local rank 0 has written it
    if not dist.env.is_local_main:
        root = demo.demo_dir()
    return root


def scan_splits(cfg: DataConfig, root: Path) -> Splits:
    """Index train (and val, or a held-out part of train). Runs on rank 0 only. A root holding a
    shard set's index (or a URL) opens the shard set instead of scanning folders."""
    shards = _shard_splits(cfg, root)
    if shards is not None:
        return shards
    memory = demo.cache_root() / "index" if cfg.index_cache else None
    train = scan(root / cfg.train_dir, cfg.classes, memory)
    val_folder = root / cfg.val_dir
    if val_folder.is_dir() and cfg.val_dir != cfg.train_dir:
        val = scan(val_folder, cfg.classes, memory)
        check_same_classes(train, val, str(val_folder))
        return Splits(train, val, f"'{val_folder}'")
    if cfg.val_fraction <= 0:
        raise DataError(f"no val folder '{val_folder}' and data.val_fraction is 0; add a val/ folder "
                        f"or set data.val_fraction (for example 0.1)")
    largest = max(Counter(train.labels).values())
    train, val = split_holdout(train, cfg.val_fraction)
    if len(val) == 0:
        # the holdout takes a share of each class: below one image in every class, none at all
        fix = ("no share can be held out without taking a class's only image: add a val/ folder" if largest < 2 else
               f"hold out at least 1/{largest} of each class (data.val_fraction={1 / largest:.3g} or more) or "
               f"add a val/ folder")
        raise DataError(f"data.val_fraction={cfg.val_fraction} holds out no image of '{root / cfg.train_dir}' (its "
                        f"largest class has {largest} image(s)); {fix}")
    return Splits(train, val, f"{cfg.val_fraction:.0%} of '{root / cfg.train_dir}' (no '{val_folder}')")


def _shard_splits(cfg: DataConfig, root: Path) -> Splits | None:
    """The splits of the shard set at ``root`` (its val split, or ``val_fraction`` of train); None
    when ``root`` is a folder without a shard index."""
    location = cfg.root if is_url(cfg.root) else str(root)
    if not is_url(location) and not (root / index_name(cfg.train_dir)).is_file():
        return None
    store = open_store(location, cfg)
    train = ShardIndex.open(store, cfg.train_dir)
    if cfg.val_dir != cfg.train_dir and has_split(store, cfg.val_dir):
        val = ShardIndex.open(store, cfg.val_dir)
        check_same_classes(train, val, f"{location}/{index_name(cfg.val_dir)}")  # type: ignore[arg-type]
        return Splits(train, val, f"shards '{location}/{index_name(cfg.val_dir)}'")  # type: ignore[arg-type]
    if cfg.val_fraction <= 0:
        raise DataError(f"shard set '{location}' has no {index_name(cfg.val_dir)} and data.val_fraction is 0; "
                        f"shard a val/ folder too or set data.val_fraction (for example 0.1)")
    held_train, val = split_holdout(train, cfg.val_fraction)  # type: ignore[arg-type]
    return Splits(held_train, val, f"{cfg.val_fraction:.0%} of shards '{location}/{index_name(cfg.train_dir)}'")


def _unreadable(index: FolderIndex, dist: Dist, max_pixels: int) -> set[str]:
    """Relative paths of files that do not decode; each rank checks a strided share."""
    bad = []
    ticker = Ticker(f"data.bad_images=skip: checking {index.root}", total=len(index), scale=dist.world_size)
    for i in range(dist.rank, len(index), dist.world_size):
        try:
            decode_rgb(index.read(i), index.name(i), max_pixels)
        except DataError:
            bad.append(index.rel(i))
        ticker.tick()
    with dist.waiting("every rank to check its share of the images (data.bad_images=skip)"):
        return {p for part in dist.all_gather_object(bad) for p in part}


def _drop_unreadable(index: FolderIndex, dist: Dist, split: str, max_pixels: int) -> FolderIndex:
    bad = _unreadable(index, dist, max_pixels)
    if bad:
        shown = ", ".join(show_path(b) for b in sorted(bad)[:3]) + (" ..." if len(bad) > 3 else "")
        log.warning("data.bad_images=skip: skipped %d unreadable %s image(s) under %s: %s",
                    len(bad), split, index.root, shown)
        index = index.without(bad)
        if not len(index):
            raise DataError(f"every {split} image under '{index.root}' is unreadable; check the files")
        present = set(index.labels)
        empty = [c for k, c in enumerate(index.classes) if k not in present]
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
        limit = cfg.data.max_image_pixels
        splits = Splits(_drop_unreadable(splits.train, dist, "train", limit),
                        _drop_unreadable(splits.val, dist, "val", limit), splits.source)
    return splits


def with_decoded_cache(index: FolderIndex, cfg: DataConfig, dist: Dist, size: int,
                       resize: int | None = None,
                       worker_init_fn: Callable[[int], None] | None = None) -> CachedImages | None:
    """For ``data.cache: decoded``: this node's cache of ``index`` at ``size`` (shorter side first
    resized to ``resize``, then centre-cropped; built first if missing, by every local rank, its
    loader workers set up by ``worker_init_fn``) as a CachedImages; else None."""
    if cfg.cache != "decoded":
        return None
    path = decoded_cache.ensure(index, size, decoded_cache.cache_folder(cfg), dist, workers=cfg.num_workers,
                                resize=resize, interpolation=cfg.interpolation, max_pixels=cfg.max_image_pixels,
                                reduced=cfg.reduced_decode, worker_init_fn=worker_init_fn)
    return CachedImages(path, len(index), size)


def train_transform(cfg: DataConfig) -> ImageTransform:
    erase = tuple(max(0, min(255, round(255 * m))) for m in cfg.mean)
    return ImageTransform(cfg.train_size, tuple(cfg.augment), tuple(cfg.rrc_scale), tuple(cfg.rrc_ratio),
                          interpolation=cfg.interpolation, erasing_p=cfg.random_erasing_p,
                          erase_value=erase)  # type: ignore[arg-type]


def eval_transform(cfg: DataConfig, cached: bool = False) -> ImageTransform:
    """Validation geometry (``data.val_crop_pct``); ``cached``: the decoded cache stores it already,
    so the transform leaves the stored squares as they are."""
    if cached:
        return ImageTransform(cfg.image_size)
    return ImageTransform(cfg.image_size, (), resize=cfg.val_resize, interpolation=cfg.interpolation)
