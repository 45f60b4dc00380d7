"""``ddp-trainer check``: scan and validate the data and config exactly as training would, and report.

Nothing is trained and ``output_dir`` is not touched. With ``--verify`` every image is decoded (with
``data.num_workers`` loader workers) and the unreadable ones are listed.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from . import config as config_mod
from .config import Config
from .data import decode, decoded_cache
from .data.datasets import Splits, resolve_root, scan_splits
from .data.folder_index import FolderIndex
from .data.decode import decode_rgb
from .data.loaders import sampler_spec
from .data.samplers import EpochPlan
from .data.workers import start_method
from .errors import EXIT_OK, EXIT_USER_ERROR, DataError, show_path
from .fsutil import human_bytes
from .launch.dist import Dist
from .launch.signals import parse_signals, worker_init_ignoring
from .models import build_model, check_input_size, check_model_name
from .training.build import check_trainable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="scan and validate data and config as training would; no training")
    p.add_argument("--config", help="YAML config (defaults < file < overrides)")
    p.add_argument("--nproc", type=int, default=1, help="processes the run will use (for the batch figures)")
    p.add_argument("--verify", action="store_true", help="decode every image and list the unreadable ones")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=cmd_check)


def _types(index: FolderIndex) -> str:
    kinds = Counter(rel[rel.rfind("."):].lower() for rel, _ in index.samples)  # every image name has a dot
    return ", ".join(f"{ext or '(none)'} {n}" for ext, n in kinds.most_common())


def _per_class(index: FolderIndex) -> list[str]:
    counts = Counter(index.labels)
    per = [(index.classes[k], counts.get(k, 0)) for k in range(len(index.classes))]
    if len(per) <= 30:
        width = max(len(name) for name, _ in per)
        return [f"    {name:<{width}}  {n}" for name, n in per]
    values = [n for _, n in per]
    smallest = sorted(per, key=lambda item: item[1])[:5]
    return [f"    per class: min {min(values)}, median {statistics.median(values):g}, max {max(values)}",
            "    smallest: " + ", ".join(f"{name} {n}" for name, n in smallest)]


def _cache_lines(splits: Splits, cfg: Config, verify: bool) -> tuple[list[str], bool]:
    """What data.cache=decoded would use or build, and whether that is possible (False: a cache to
    build in a folder that cannot be written). ``verify``: existing caches are checked in full."""
    folder = decoded_cache.cache_folder(cfg.data)
    parts = [("train", splits.train, cfg.data.train_cache_size, None),
             ("val", splits.val, cfg.data.image_size, cfg.data.val_resize)]
    total = sum(decoded_cache.nbytes(len(ix), size) for _, ix, size, _ in parts)
    if cfg.data.cache != "decoded":
        return [f"cache: data.cache=none (data.cache=decoded would need {human_bytes(total)} in '{folder}')"], True
    lines = [f"cache: data.cache=decoded in '{folder}'"]
    need = 0
    for split, ix, size, resize in parts:
        key = decoded_cache.cache_key(ix, size, resize, cfg.data.interpolation, cfg.data.reduced_decode)
        path = folder / decoded_cache.file_name(key, len(ix), size)
        size_b = decoded_cache.nbytes(len(ix), size)
        state = "exists" if path.exists() else "to build"
        if path.exists() and verify:
            why = decoded_cache.damage(path, len(ix), size, sample=None)
            state = f"exists, damaged ({why}): the next run builds it again" if why else "exists, every chunk intact"
            need += size_b if why else 0
        else:
            need += 0 if path.exists() else size_b
        lines.append(f"    {split}: {path.name} ({len(ix)} images at {size}x{size}, {human_bytes(size_b)}) {state}")
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    verdict = "enough" if free >= need else "NOT enough: set data.cache_dir to a larger disk"
    lines.append(f"    to build: {human_bytes(need)}; free: {human_bytes(free)} ({verdict})")
    if need and not decoded_cache.writable(probe):
        lines.append(f"    '{probe}' is NOT writable: set data.cache_dir to a writable folder, or use data.cache=none")
        return lines, False
    return lines, True


class _Probe(torch.utils.data.Dataset):
    """Decodes the ``k``-th image of ``index`` in the order its bytes lie (a shard set's storage
    order: a shuffled set's sample order jumps between shards, and each remote shard should be
    fetched once): ``(i, "")``, or ``(i, why)`` when image ``i`` does not decode. Module-level, so
    that a worker started by ``spawn`` or ``forkserver`` can unpickle it."""

    def __init__(self, index: FolderIndex, max_pixels: int) -> None:
        self.index, self.max_pixels = index, max_pixels
        storage_order = getattr(index, "storage_order", None)
        self.order = storage_order() if storage_order is not None else None  # pickles as one array

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> tuple[int, str]:
        i = int(self.order[k]) if self.order is not None else k
        try:
            decode_rgb(self.index.read(i), self.index.name(i), self.max_pixels)
            return i, ""
        except DataError as exc:
            return i, exc.message


def _verify(index: FolderIndex, workers: int, max_pixels: int,
            signals: Sequence[signal.Signals] = ()) -> list[tuple[str, str]]:
    """(relative path, reason) of every image of ``index`` that does not decode. The loader's
    workers ignore ``signals`` (the stop signals, as the training loaders' workers do), so that a
    signal sent to every process reaches the command, not a worker that would die of it."""
    loader = torch.utils.data.DataLoader(_Probe(index, max_pixels), batch_size=None, num_workers=workers,
                                         worker_init_fn=worker_init_ignoring(signals),
                                         multiprocessing_context=start_method(workers))
    return [(index.rel(i), why) for i, why in sorted((int(i), why) for i, why in loader if why)]


def cmd_check(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    cfg = config_mod.load(args.config, args.overrides)
    decode.use(cfg.data.decoder)  # the cache key and --verify's decodes are the run's
    check_model_name(cfg.model.name, drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate)
    check_input_size(cfg.model.name, cfg.data.input_sides())
    root = resolve_root(cfg.data, Dist.single())
    splits = scan_splits(cfg.data, root)
    scanned = time.monotonic() - t0
    model = build_model(cfg.model.name, len(splits.classes), drop_rate=cfg.model.drop_rate,
                        drop_path_rate=cfg.model.drop_path_rate)
    world = max(1, args.nproc)
    check_trainable(len(splits.train), world, cfg.data.batch_size, model, len(splits.classes), cfg.checkpoint.monitor)
    print(f"config: valid ({len(config_mod.valid_keys())} keys); model {cfg.model.name} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(splits.classes)} classes)")
    for key, value in cfg.taken_from_model:
        print(f"  data.{key}={value} (data.from_model: {cfg.model.name}'s pretrained config)")
    print(f"data: root '{root}', scanned in {scanned:.1f} s; val from {splits.source}; decoder {decode.decoder_name(cfg.data.reduced_decode)}")
    for split, index in (("train", splits.train), ("val", splits.val)):
        print(f"  {split}: {len(index)} images in {len(index.classes)} classes; file types: {_types(index)}")
        for line in _per_class(index):
            print(line)
    plan = EpochPlan(len(splits.train), world=world, rank=0, batch_size=cfg.data.batch_size,
                     accum=cfg.train.grad_accum_steps, seed=cfg.seed, epoch=0, drop_last=cfg.data.drop_last,
                     sampler=sampler_spec(cfg.data, splits.train))
    global_batch = world * cfg.data.batch_size * cfg.train.grad_accum_steps
    if plan.partial_only:
        tail = "fewer images than one global batch: each epoch is one partial step"
    elif plan.dropped:
        tail = f"{plan.dropped} image(s) of each epoch left out (data.drop_last=true)"
    else:
        tail = "every image used each epoch" if cfg.data.sampler == "plan" else "every draw used each epoch"
    if plan.padded:
        tail += f"; data.sampler=distributed pads {plan.padded} repeated image(s)"
    elif cfg.data.sampler != "plan":
        tail += f"; data.sampler={cfg.data.sampler}"
    print(f"batches: global batch {global_batch} = {cfg.data.batch_size} x {world} process(es) x "
          f"{cfg.train.grad_accum_steps}; {len(plan)} optimizer step(s) per epoch; {tail}")
    lines, cache_ok = _cache_lines(splits, cfg, args.verify)
    for line in lines:
        print(line)
    if not cache_ok:
        return EXIT_USER_ERROR
    if not args.verify:
        print("images: not decoded (add --verify to decode every image)")
        return EXIT_OK
    t1 = time.monotonic()
    bad = [(split, rel, why) for split, index in (("train", splits.train), ("val", splits.val))
           for rel, why in _verify(index, cfg.data.num_workers, cfg.data.max_image_pixels,
                                   parse_signals(cfg.preempt.signals))]
    n = len(splits.train) + len(splits.val)
    print(f"images: decoded {n} in {time.monotonic() - t1:.1f} s; {len(bad)} unreadable")
    for split, rel, why in bad[:50]:
        print(f"  {split}: '{show_path(rel)}': {why}")
    if len(bad) > 50:
        print(f"  ... and {len(bad) - 50} more")
    if bad and cfg.data.bad_images == "error":
        print("result: training would stop at these files; replace or delete them, or set data.bad_images=skip")
        return EXIT_USER_ERROR
    if bad:
        print("result: data.bad_images=skip would leave these files out")
    return EXIT_OK
