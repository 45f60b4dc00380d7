"""The ``ddp-trainer`` subcommands other than ``train`` and ``check``: the checkpoint tools
(``inspect``, ``convert``, ``evaluate``, ``export``, ``predict``, ``weights``), pictures (``grid``, ``plot``) and
``demo-data``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from . import api
from . import config as config_mod
from .checkpoint.format import Checkpoint
from .checkpoint.reader import read_checkpoint
from .checkpoint.weights import common_prefix, fit_prefix, load_weights, output_count
from .checkpoint.writer import atomic_save
from .data.datasets import FolderDataset, build_splits, eval_transform, train_transform
from .data import shard_writer
from .data.demo import CLASSES, write_demo_data
from .data.images import load_rgb
from .data.samplers import EpochPlan
from .data.transforms import ImageTransform, Normalize
from .errors import EXIT_OK, CheckpointError, ConfigError, DataError, ImageError
from .export.artifact import FORMATS
from .export.publish import ExportRequest, export_checkpoint
from .export.runtime import OnnxClassifier
from .launch.dist import Dist
from .launch.environment import process_rank
from .models import build_model, check_model_name, name_of_file_arch
from .pictures import save_curves, save_grid
from .pretrained import resolve as resolve_weights

log = logging.getLogger("ddp_trainer")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow pickled checkpoints (torch.save(model)); this runs code from the file")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")


def register(sub: argparse._SubParsersAction) -> None:
    _register_pictures(sub)
    d = sub.add_parser("demo-data", help="write the built-in demo dataset as plain class folders")
    d.add_argument("out")
    d.add_argument("--train-per-class", type=int, default=200)
    d.add_argument("--val-per-class", type=int, default=50)
    d.add_argument("--size", type=int, default=32)
    d.add_argument("--traceback", action="store_true")
    d.set_defaults(fn=cmd_demo_data)
    _register_shard(sub)
    p = sub.add_parser("inspect", help="print what a checkpoint holds, without building a model")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    _add_common(p)
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("convert", help="write a plain weights file from any accepted checkpoint")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--prefix", default="", help="key prefix to add, e.g. 'module.' for DataParallel code")
    p.add_argument("--strip-prefix", default="", help="key prefix to remove, with or without its dot, e.g. 'model' (a LightningModule attribute)")
    p.add_argument("--model", help="model name to check the keys against (default: the one the file names)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights (runs with train.ema_decay)")
    _add_common(p)
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("evaluate", help="exact val loss / accuracy of a checkpoint (works under torchrun)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", help="YAML config (default: the config stored in the checkpoint)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--ema", action="store_true", help="use the EMA weights (runs with train.ema_decay)")
    p.add_argument("--tta", choices=("none", "flip"), default=None,
                   help="flip: the mean logits of each image and its mirror (default: the run's train.val_tta)")
    _add_common(p)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("export", help="an ONNX file or torch.export program of a checkpoint, checked against the "
                                      "PyTorch model before it is written")
    p.add_argument("checkpoint", help="any checkpoint evaluate accepts")
    p.add_argument("out", help="the file to write (.onnx, or .pt2 for --format exported)")
    p.add_argument("--format", choices=tuple(FORMATS), default=None,
                   help="onnx (ONNX Runtime) or exported (torch.export .pt2); default: exported for OUT.pt2, else onnx")
    p.add_argument("--ema", action="store_true", help="use the EMA weights (runs with train.ema_decay)")
    p.add_argument("--batch", default="dynamic", help="dynamic (default) or a fixed batch size N")
    p.add_argument("--preprocess", action="store_true",
                   help="the file takes uint8 images (N, 3, H, W) at the validation size and normalises them itself")
    p.add_argument("--opset", default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--check", default="64", help="images the export is checked on (default 64)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. model.name=resnet18 data.image_size=64")
    _add_common(p)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("predict", help="top classes of images, by name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint")
    src.add_argument("--model", help="an ONNX file written by ddp-trainer export (runs in ONNX Runtime)")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's data.image_size")
    p.add_argument("images", nargs="+")
    p.add_argument("--ema", action="store_true", help="use the EMA weights (runs with train.ema_decay)")
    _add_common(p)
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("weights", help="the file and URL of pretrained weights (model.weights), and where to put it")
    p.add_argument("model", help="a torchvision classifier (resnet18) or a timm model (timm/resnet18.a1_in1k)")
    p.add_argument("weights", nargs="?", default="DEFAULT",
                   help="DEFAULT (default), IMAGENET1K_V1, ...; for timm: DEFAULT (the hub cache), local-dir:FOLDER, FILE")
    p.add_argument("--traceback", action="store_true")
    p.set_defaults(fn=cmd_weights)


def cmd_demo_data(args: argparse.Namespace) -> int:
    out = write_demo_data(args.out, args.train_per_class, args.val_per_class, args.size)
    print(f"wrote {len(CLASSES)} classes x ({args.train_per_class} train + {args.val_per_class} val) images to {out}")
    return EXIT_OK


def _register_shard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shard", help="a class-folder tree as WebDataset tar shards with an index (a shard set)")
    p.add_argument("paths", nargs="+", metavar="DATA_ROOT OUT | SHARD",
                   help="DATA_ROOT OUT; with --index-only: the shards to index")
    p.add_argument("--shard-size", type=int, default=None, help="bytes per shard (default 512 MB)")
    p.add_argument("--workers", type=int, default=1, help="shards written in parallel")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--shuffle", type=int, default=shard_writer.DEFAULT_SHUFFLE_SEED, metavar="SEED",
                       help="place the samples in the shards in a permutation drawn from SEED (default "
                            f"{shard_writer.DEFAULT_SHUFFLE_SEED}), so each shard mixes classes; the set's sample "
                            "order stays the tree's (sample i is file i), so only readers of a few shards at a "
                            "time (data.sampler=shard_window, webdataset) see the difference")
    order.add_argument("--no-shuffle", action="store_true",
                       help="place the samples in the tree's order (a shard holds one class or two)")
    p.add_argument("--index-only", action="store_true", help="index shards written elsewhere (webdataset, tarp)")
    p.add_argument("--classes", help="--index-only: a JSON list of class names (label k is the k-th)")
    p.add_argument("--traceback", action="store_true")
    p.set_defaults(fn=cmd_shard)


def cmd_shard(args: argparse.Namespace) -> int:
    """``shard DATA_ROOT OUT`` or ``shard --index-only SHARD...``."""
    if args.index_only:
        classes = None
        if args.classes:
            try:
                classes = json.loads(Path(args.classes).read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--classes '{args.classes}' is not a readable JSON list of class names "
                                  f"({exc})") from None
            if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
                raise ConfigError(f"--classes '{args.classes}' must hold a JSON list of class names")
        folder, split, n = shard_writer.index_only(args.paths, classes)
        print(f"indexed {n} samples of {len(args.paths)} shard(s) as split {split!r}: "
              f"{folder / (split + '.index.json')}")
        return EXIT_OK
    if len(args.paths) != 2:
        raise ConfigError("shard: give DATA_ROOT OUT (or --index-only SHARD...)")
    if args.workers < 1:
        raise ConfigError(f"shard: --workers {args.workers}: use 1 or more")
    counts = shard_writer.shard_tree(args.paths[0], args.paths[1],
                                     args.shard_size or shard_writer.DEFAULT_SHARD_SIZE, args.workers,
                                     shuffle_seed=None if args.no_shuffle else args.shuffle)
    print("wrote " + ", ".join(f"{s}: {n} samples" for s, n in counts.items()) + f" to {args.paths[1]}")
    return EXIT_OK


def cmd_weights(args: argparse.Namespace) -> int:
    """Where ``model.weights`` looks for a file, and where to get it."""
    found = resolve_weights(args.model, args.weights)
    print(f"weights: {found.weights}")
    print(f"file:    {found.path.name}")
    print(f"folder:  {found.path.parent} ({'present' if found.present else 'missing'})")
    if found.url:
        print(f"url:     {found.url}")
    how = getattr(found, "how", None)  # timm's files: the hub cache's layout, a folder or a path
    if how and not found.present:
        print(f"get it:  {how}")
    return EXIT_OK


def _register_pictures(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grid", help="save a grid of one batch after augmentation, with class names")
    p.add_argument("--split", choices=["train", "val"], default="train")
    p.add_argument("--out", default="grid.png")
    p.add_argument("--count", type=int, default=32, help="images in the grid")
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    _add_common(p)
    p.set_defaults(fn=cmd_grid)

    p = sub.add_parser("plot", help="PNG curves of loss, accuracy, lr and throughput from RUN_DIR/metrics.jsonl")
    p.add_argument("run_dir")
    p.add_argument("--out", help="default: RUN_DIR/curves.png")
    _add_common(p)
    p.set_defaults(fn=cmd_plot)


def cmd_grid(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config, args.overrides)
    splits = build_splits(cfg, Dist.single())
    if args.split == "train":
        ds = FolderDataset(splits.train, train_transform(cfg.data), cfg.seed, max_pixels=cfg.data.max_image_pixels)
        plan = EpochPlan(len(ds), world=1, rank=0, batch_size=min(args.count, len(ds)), accum=1, seed=cfg.seed,
                         epoch=0, max_steps=1)
        keys = plan.step(0)[0]
    else:
        ds = FolderDataset(splits.val, eval_transform(cfg.data), cfg.seed, max_pixels=cfg.data.max_image_pixels)
        keys = list(range(min(args.count, len(ds))))
    items = [ds[k] for k in keys]
    images = torch.stack([it[0] for it in items])
    size = save_grid(images, [it[1] for it in items], splits.classes, Path(args.out))
    print(f"wrote {args.out}: {len(items)} {args.split} images after augmentation, {size[0]}x{size[1]} px")
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(args.run_dir) / "curves.png"
    size = save_curves(Path(args.run_dir), out)
    print(f"wrote {out}: {size[0]}x{size[1]} px")
    return EXIT_OK


def _ema_summary(entry: dict[str, Any] | None) -> str | None:
    if not entry:
        return None
    count = "unknown" if entry.get("n_averaged") is None else entry["n_averaged"]
    decay = "" if entry.get("decay") is None else f", decay {entry['decay']:.6g}"
    return f"{len(entry['weights'])} tensors, {count} updates{decay} (read with --ema)"


def summary(loaded: Checkpoint) -> dict[str, Any]:
    """What ``inspect`` reports (JSON-serialisable)."""
    n_params = sum(int(v.numel()) for v in loaded.model.values())
    info: dict[str, Any] = {
        "path": loaded.path, "format": loaded.kind, "tensors": len(loaded.model), "parameters": n_params,
        "renamed_keys": loaded.renamed, "has_optimizer": loaded.optimizer is not None,
        "ema": _ema_summary(loaded.get("model_ema")),
    }
    if loaded.layout is not None:
        info.update({"epoch": loaded.layout.epoch_entry, "epoch_means": loaded.layout.epoch_means,
                     "resumes_at_epoch": loaded.start_epoch})
        if loaded.layout.arch:
            info["arch"] = loaded.layout.arch
    elif loaded.ours:
        info.update({"epoch": loaded.epoch, "resumes_at_epoch": loaded.start_epoch})
    if loaded.ours:
        info.update({
            "position": loaded.get("position"), "epoch_complete": loaded.get("epoch_complete"),
            "step": loaded.get("step"), "best": loaded.get("best"), "monitor": loaded.get("monitor"),
            "model": loaded.model_name, "classes": list(loaded.class_to_idx or {}),
            "world_size": loaded.get("world_size"), "torch_version": loaded.get("torch_version"),
            "config": loaded.config,
        })
    return info


def cmd_inspect(args: argparse.Namespace) -> int:
    info = summary(read_checkpoint(args.path, args.trust_checkpoint))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return EXIT_OK
    for key, value in info.items():
        if key == "config":
            continue
        if key == "classes":
            value = f"{len(value)}: {', '.join(value[:10])}{' ...' if len(value) > 10 else ''}"
        print(f"{key:>17}: {value}")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    """A plain state dict that loads with ``strict=True`` into the model (``--model``, else the one the
    file names), or an error; without any model to check against, keys that all still carry one
    leading prefix are refused (they would not load into the bare model)."""
    loaded = read_checkpoint(args.input, args.trust_checkpoint)
    out = Path(args.output)
    if out.resolve() == Path(args.input).resolve():
        raise CheckpointError(f"convert would overwrite its input '{args.input}'; choose another OUT")
    sd = dict(loaded.weights(args.ema))
    if args.strip_prefix:
        # a prefix is whole key segments: 'model' means 'model.' (stripping it alone would leave '.conv1...')
        strip = args.strip_prefix if args.strip_prefix.endswith(".") else args.strip_prefix + "."
        if not all(k.startswith(strip) for k in sd):
            bad = next(k for k in sd if not k.startswith(strip))
            raise CheckpointError(f"--strip-prefix {strip!r}: key {bad!r} does not start with it; the keys start "
                                  f"with {common_prefix(list(sd)) or bad.split('.')[0] + '.'!r}")
        sd = {k[len(strip):]: v for k, v in sd.items()}
    name = args.model or loaded.model_name or (name_of_file_arch(loaded.layout.arch, loaded.layout.name)
                                                if loaded.layout and loaded.layout.arch else None)
    checked = ""
    if name:
        check_model_name(name)
        model = build_model(name, output_count(sd))
        sd, prefix = fit_prefix(sd, model.state_dict())
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"convert: the weights of '{args.input}' do not load into {name} "
                                  f"({str(exc).splitlines()[0][:200]}); name the right model with --model") from None
        checked = f", loads into {name}" + (f" (prefix {prefix!r} stripped)" if prefix else "")
    elif common_prefix(list(sd)) and len(sd) > 1:
        p = common_prefix(list(sd))
        raise CheckpointError(f"convert: every key of '{args.input}' starts with {p!r} (a wrapper's attribute, e.g. a "
                              f"LightningModule's self.model), so the file would not load into the bare model; pass "
                              f"--model NAME (e.g. resnet18) to fit and check the keys, or --strip-prefix {p}")
    sd = {f"{args.prefix}{k}": v for k, v in sd.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(sd, out)
    print(f"wrote {len(sd)} tensors ({loaded.kind} -> plain state dict{checked}"
          f"{', prefix ' + args.prefix if args.prefix else ''}) to {out}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    metrics = api.evaluate(args.checkpoint, args.config, ema=args.ema, tta=args.tta,
                           trust_checkpoint=args.trust_checkpoint, **config_mod.parse_overrides(args.overrides))
    if process_rank(os.environ) == 0:
        if args.json:
            print(api.dumps(metrics))
        else:
            for name, acc in metrics["per_class_acc"].items():
                print(f"{name:>24}: {acc:.4f}")
            print(f"val_loss={metrics['val_loss']:.6f} val_acc={metrics['val_acc']:.6f} count={metrics['count']}")
    return EXIT_OK


def _whole(flag: str, value: str, low: int, dynamic: bool = False) -> int | None:
    """A flag's integer value of at least ``low`` (or None for 'dynamic' where allowed); ConfigError otherwise."""
    if dynamic and value == "dynamic":
        return None
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if number < low:
        also = "'dynamic' or " if dynamic else ""
        raise ConfigError(f"{flag}: bad value {value!r}; use {also}a whole number of at least {low}")
    return number


def export_request(args: argparse.Namespace) -> ExportRequest:
    """The export the flags ask for, or ConfigError naming the flag."""
    fmt = args.format or ("exported" if str(args.out).endswith(".pt2") else "onnx")
    opset = None if args.opset is None else _whole("--opset", args.opset, 7)
    if opset is not None and fmt != "onnx":
        raise ConfigError("--opset applies to --format onnx only; leave it out for --format exported")
    return ExportRequest(fmt=fmt, ema=args.ema, batch=_whole("--batch", args.batch, 1, dynamic=True),
                         preprocess=args.preprocess, opset=opset, check=_whole("--check", args.check, 1))


def cmd_export(args: argparse.Namespace) -> int:
    request = export_request(args)
    out = Path(args.out)
    if out.is_dir() or out.resolve() == Path(args.checkpoint).resolve():
        raise ConfigError(f"export OUT '{args.out}' is a folder or the checkpoint itself; name the file to write")
    loaded = read_checkpoint(args.checkpoint, args.trust_checkpoint)
    overrides = config_mod.parse_overrides(args.overrides)
    cfg, name = api.evaluation_model(loaded, None, overrides)
    if loaded.layout is not None and loaded.layout.arch and "model.name" not in overrides:
        name = loaded.layout.arch  # a foreign file that names its model (timm, torchvision's references), as convert
    export_checkpoint(loaded, cfg, name, out, request)
    return EXIT_OK


def _print_top(path: str, probs: torch.Tensor, classes: list[str], top: int) -> None:
    best = probs.topk(min(top, len(classes)))
    print(f"{path}: " + ", ".join(f"{classes[i]} {p:.3f}" for p, i in zip(best.values.tolist(), best.indices.tolist())),
          flush=True)


def cmd_predict(args: argparse.Namespace) -> int:
    """One line per image with its top classes, in the order given. An image that cannot be read or
    decoded is named on stderr (with no training key: predict has no data.bad_images) and the next
    ones still predicted; then exit 2 naming how many failed."""
    if args.model:
        if args.image_size or args.ema:
            raise ConfigError(f"{'--image-size' if args.image_size else '--ema'} does not apply to --model (the file's "
                              f"input side and weights were fixed when it was exported); leave it out")
        classifier = OnnxClassifier(args.model)
        for path in args.images:
            _print_top(path, torch.from_numpy(classifier.probabilities(path)), classifier.classes, args.top)
        return EXIT_OK
    loaded = read_checkpoint(args.checkpoint, args.trust_checkpoint)
    cfg = loaded.config or {}
    data = cfg.get("data", {})
    if loaded.class_to_idx:
        classes = list(loaded.class_to_idx)
    else:
        classes = [str(i) for i in range(output_count(loaded.weights(args.ema)))]
    name = loaded.model_name or cfg.get("model", {}).get("name")
    if not name:
        raise CheckpointError(f"checkpoint '{args.checkpoint}' does not name its model; predict needs a "
                              f"ddp_trainer checkpoint")
    model = build_model(name, len(classes))
    load_weights(model, loaded.weights(args.ema), source=f"checkpoint '{args.checkpoint}'")
    model.eval()
    size = args.image_size or data.get("image_size", 224)
    tf = ImageTransform(size, ())
    norm = Normalize(data.get("mean", [0.485, 0.456, 0.406]), data.get("std", [0.229, 0.224, 0.225]))
    unread: list[str] = []
    with torch.no_grad():
        for path in args.images:
            try:
                img = load_rgb(path)
            except ImageError as exc:  # named, and the next images still predicted
                print(f"error: {exc.plain}", file=sys.stderr, flush=True)
                unread.append(path)
                continue
            x = norm(tf(img, None)[None])
            _print_top(path, torch.softmax(model(x).float(), dim=1)[0], classes, args.top)
    if unread:
        raise DataError(f"predict: {len(unread)} of {len(args.images)} image(s) could not be read "
                        f"({', '.join(unread[:3])}{', ...' if len(unread) > 3 else ''}); the others were predicted")
    return EXIT_OK
