"""What an export is made from: a checkpoint's model (its weights or its EMA's, in eval mode, fp32 on
the CPU), its class names, the input side of its validation (size, crop, mean, std) and the images
its export is checked on."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..checkpoint.format import Checkpoint
from ..checkpoint.weights import load_weights, output_count
from ..config import Config, DataConfig
from ..errors import DataError, show_path
from ..data import demo
from ..data.datasets import FolderDataset, eval_transform, scan_splits
from ..data.transforms import Normalize
from ..models import build_model
from ..runlog import MetricsFile

EPOCH_FIGURES = ("train_loss", "val_loss", "val_acc", "val_acc5", "val_loss_ema", "val_acc_ema", "val_count")


def class_names(loaded: Checkpoint, num_outputs: int) -> list[str]:
    """The checkpoint's class names in index order (a file without them: "0", "1", ...)."""
    if loaded.class_to_idx:
        return [name for name, _ in sorted(loaded.class_to_idx.items(), key=lambda kv: kv[1])]
    return [str(i) for i in range(num_outputs)]


def epoch_metrics(loaded: Checkpoint) -> dict[str, object]:
    """The figures of the checkpoint's epoch from its run's ``metrics.jsonl`` (a file of ours in the
    run's ``checkpoints/`` folder, taken at the end of an epoch; else none: a checkpoint holds only
    its best monitored value)."""
    path = Path(loaded.path)
    if not loaded.ours or not loaded.get("epoch_complete", True) or path.parent.name != "checkpoints":
        return {}
    rows = [r for r in MetricsFile(path.parent.parent / "metrics.jsonl").rows() if r.get("epoch") == loaded.epoch]
    return {k: v for k, v in rows[-1].items() if k in EPOCH_FIGURES} if rows else {}


@dataclass
class Source:
    model: nn.Module  # eval mode, fp32, CPU; takes normalised float images, or uint8 ones with preprocess
    classes: list[str]
    data: DataConfig
    preprocess: bool
    metadata: dict[str, str]  # what goes into the file (every value JSON)


def load_source(loaded: Checkpoint, cfg: Config, name: str, *, ema: bool, preprocess: bool) -> Source:
    """The model of ``loaded`` as ``name`` builds it (its EMA weights with ``ema``); with
    ``preprocess`` behind the run's normalisation, taking uint8 pixels."""
    weights = loaded.weights(ema)
    classes = class_names(loaded, output_count(weights))
    model = build_model(name, len(classes))
    load_weights(model, weights, source=f"checkpoint '{show_path(loaded.path)}'")
    if preprocess:  # the training pipeline's own normalisation, so the arithmetic is the same
        model = nn.Sequential(Normalize(cfg.data.mean, cfg.data.std), model)
    model = model.float().eval()
    meta = {
        "classes": classes, "image_size": cfg.data.image_size, "val_resize": cfg.data.val_resize or cfg.data.image_size,
        "val_crop_pct": cfg.data.val_crop_pct, "interpolation": cfg.data.interpolation,
        "mean": list(cfg.data.mean), "std": list(cfg.data.std), "preprocess": preprocess,
        "input": ("uint8 pixels (N, 3, H, W), RGB, normalised inside" if preprocess else
                  "float32 (N, 3, H, W), RGB, (pixel / 255 - mean) / std"),
        "model_name": name, "epoch": loaded.epoch, "ema": ema, "checkpoint": Path(loaded.path).name,
        "checkpoint_format": loaded.kind,
        "metrics": {"monitor": loaded.get("monitor"), "best": loaded.get("best"), "best_k": loaded.get("best_k"),
                    **epoch_metrics(loaded)},
        "producer": f"ddp_trainer {__version__}, torch {torch.__version__}",
    }
    return Source(model, classes, cfg.data, preprocess, {k: json.dumps(v) for k, v in meta.items()})


def _val_root(data: DataConfig) -> Path | None:
    if data.root == "demo":  # the built-in data, when a run has written it; never written for a check
        return demo.demo_dir() if (demo.demo_dir() / "COMPLETE").exists() else None
    root = Path(data.root).expanduser()
    return root if root.is_dir() else None


def check_images(data: DataConfig, count: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``count`` uint8 images (N, 3, S, S) at the validation size, and where they came from: the
    validation split of ``data.root`` through the validation transform (spread over the split; all
    of it when smaller), else random pixels."""
    root = _val_root(data)
    note = f"data.root '{data.root}' is not a folder here"
    if root is not None:
        try:
            val = FolderDataset(scan_splits(data, root).val, eval_transform(data), seed, max_pixels=data.max_image_pixels)
        except DataError as exc:
            note = f"data.root '{data.root}': {exc.message}"
        else:
            if len(val):
                picks = np.unique(np.linspace(0, len(val) - 1, min(count, len(val))).round().astype(int))
                images = torch.stack([val[int(i)][0] for i in picks])
                return images, f"{len(images)} validation images of {show_path(root)}"
    gen = torch.Generator().manual_seed(seed)
    size = data.image_size
    images = torch.randint(0, 256, (count, 3, size, size), generator=gen, dtype=torch.uint8)
    return images, f"{count} random images ({note})"


def model_inputs(source: Source, images: torch.Tensor) -> np.ndarray:
    """What the exported file takes for ``images`` (uint8): the pixels themselves with preprocess,
    else normalised as the run's validation normalises them."""
    if source.preprocess:
        return images.numpy()
    return Normalize(source.data.mean, source.data.std)(images).numpy()
