"""The Python entry points: :func:`train` runs what ``launch.py`` runs and :func:`evaluate` what
``ddp-trainer evaluate`` runs, in the calling process (a notebook, a script under torchrun, a Ray
Train worker), returning results instead of exit codes.

Errors raise the project's exceptions (:class:`~ddp_trainer.errors.UserError` and its subclasses,
with the one-line message the command line prints; a stop signal raises
:class:`~ddp_trainer.launch.signals.Preempted` after the checkpoint); the interpreter is never
ended, no signal handler stays installed, and calling twice logs each line once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from .checkpoint.reader import read_checkpoint
from .checkpoint.weights import load_weights
from .config import Config, build
from .data.datasets import FolderDataset, build_splits, eval_transform
from .data.loaders import make_eval_loader
from .data.transforms import Normalize
from .errors import CheckpointError, ConfigError
from .launch.environment import resolve
from .launch.session import launched
from .launch.signals import StopRequest, parse_signals, stop_with_parent
from .models import build_model
from .runlog import setup_logging
from .training.engine import evaluate as exact_evaluation
from .training.run import RunResult, check_config, execute

TrainResult = RunResult


def train(config: str | Path | Mapping[str, Any] | Config | None = None, *, trust_checkpoint: bool = False,
          **overrides: Any) -> TrainResult:
    """Train, exactly as ``launch.py`` does with the same config, in this process (under torchrun,
    srun, Ray Train or a Kubeflow pod: as that rank). ``config``: a YAML file, a nested mapping or a
    Config (None: the defaults); ``overrides``: dotted keys (``**{"train.epochs": 5}``), sections
    (``train={"epochs": 5}``) or top-level keys (``output_dir="runs/x"``). Returns the run's result
    (final and best metrics, output folder, checkpoint paths, the resolved config)."""
    env = resolve(os.environ)
    setup_logging(env.rank)
    cfg = check_config(build(config, overrides), env, debug=False)
    if env.source == "torchrun":
        stop_with_parent()
    stop = StopRequest(parse_signals(cfg.preempt.signals), hard_exit=False).install()
    try:
        return execute(cfg, env, stop, trust_checkpoint=trust_checkpoint)
    finally:
        stop.uninstall()


def evaluate(checkpoint: str | Path, config: str | Path | Mapping[str, Any] | None = None, *, ema: bool = False,
             tta: str | None = None, trust_checkpoint: bool = False, **overrides: Any) -> dict[str, Any]:
    """Exact validation of ``checkpoint`` (its EMA weights with ``ema``; ``tta="flip"``: the mean
    logits of each image and its mirror, default ``train.val_tta``): ``{"val_loss", "val_acc",
    "val_acc5", "count", "per_class_acc"}``, what ``ddp-trainer evaluate --json`` prints. The data and
    model come from the checkpoint's stored config unless ``config`` / ``overrides`` say otherwise.
    Under torchrun every rank evaluates its share and gets the whole result."""
    env = resolve(os.environ)
    setup_logging(env.rank)
    with launched(env, mode_request="auto", backend="auto", timeout_s=300.0) as (dist, _):
        loaded = dist.main_then_broadcast(lambda: read_checkpoint(checkpoint, trust_checkpoint))
        if config is None:
            base = {k: v for k, v in (loaded.config or {}).items() if k in ("data", "model", "seed", "train")}
        elif isinstance(config, Mapping):
            base = dict(config)
        else:
            base = str(config)
        cfg = build(base, overrides)
        splits = build_splits(cfg, dist)
        if loaded.class_to_idx is not None and dict(loaded.class_to_idx) != splits.class_to_idx:
            raise CheckpointError(f"checkpoint '{checkpoint}' classes {list(loaded.class_to_idx)} differ "
                                  f"from the data's {list(splits.classes)}; point data.root at its dataset")
        model = build_model(loaded.model_name or cfg.model.name, len(splits.classes))
        load_weights(model, loaded.weights(ema), source=f"checkpoint '{checkpoint}'")
        model.to(dist.device)
        val = FolderDataset(splits.val, eval_transform(cfg.data), cfg.seed, max_pixels=cfg.data.max_image_pixels)
        loader = make_eval_loader(val, cfg.data, dist, dist.device)
        tta = cfg.train.val_tta if tta is None else tta
        if tta not in ("none", "flip"):
            raise ConfigError(f"tta: bad value {tta!r}; use 'flip' or 'none'")
        res = exact_evaluation(model, loader, Normalize(cfg.data.mean, cfg.data.std).to(dist.device), dist.device,
                               dist, len(splits.classes), len(val), cfg.train.precision, tta=tta)
    return {"val_loss": res.loss, "val_acc": res.acc, "val_acc5": res.acc5, "count": res.count,
            "per_class_acc": dict(zip(splits.classes, res.per_class_acc))}


def dumps(metrics: Mapping[str, Any]) -> str:
    """``evaluate``'s result as the command line prints it with ``--json``."""
    return json.dumps(dict(metrics))
