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
import logging
import os
import threading
from pathlib import Path
from typing import Any, Mapping

from .checkpoint.format import Checkpoint
from .checkpoint.reader import read_checkpoint
from .checkpoint.weights import load_weights
from .config import Config, build, read_yaml
from .data.datasets import FolderDataset, build_splits, eval_transform
from .data.loaders import make_eval_loader
from .data.transforms import Normalize
from .errors import CheckpointError, ConfigError, UserError
from .launch.environment import resolve
from .launch.session import launched
from .launch.signals import StopRequest, parse_signals, stop_with_parent
from .models import build_model
from .runlog import console_logging
from .training.engine import evaluate as exact_evaluation
from .training.run import RunResult, check_config, execute

TrainResult = RunResult
log = logging.getLogger("ddp_trainer")
_TRAINING = threading.Lock()  # held by the train() call running in this process
_RUNNING: list[StopRequest] = []  # the stop request of the train() call running now, if any


def request_stop() -> bool:
    """Ask the ``train()`` call running in this process, in any thread, to stop at its next step with a
    checkpoint, as Ctrl-C (SIGINT) would: it then raises Preempted, and the same call resumes it. For
    a run in a thread of its own (a notebook, a server), where no signal handler can be installed.
    Returns False when no run is in progress."""
    running = list(_RUNNING)
    for stop in running:
        stop.request("SIGINT")
    return bool(running)


def train(config: str | Path | Mapping[str, Any] | Config | None = None, *, trust_checkpoint: bool = False,
          **overrides: Any) -> TrainResult:
    """Train, exactly as ``launch.py`` does with the same config, in this process (under torchrun,
    srun, Ray Train or a Kubeflow pod: as that rank). ``config``: a YAML file, a nested mapping or a
    Config (None: the defaults); ``overrides``: dotted keys (``**{"train.epochs": 5}``), sections
    (``train={"epochs": 5}``) or top-level keys (``output_dir="runs/x"``). Returns the run's result
    (final and best metrics, output folder, checkpoint paths, the resolved config). One call at a
    time per process: a call while another thread's runs raises UserError.

    Called in a thread other than the main one, no signal handler can be installed: the run stops at
    its next step with a checkpoint when :func:`request_stop` is called, or when the main thread dies
    of an uncaught exception (Ctrl-C during ``thread.join()``)."""
    if not _TRAINING.acquire(blocking=False):
        raise UserError("ddp_trainer.train() is already running in this process (another thread called it); a run "
                        "owns the process's logging, signal handlers and random generators, so two at once would "
                        "interleave: wait for the first to return, or start the second in a process of its own")
    try:
        env = resolve(os.environ)
        with console_logging(env.rank):
            cfg = check_config(build(config, overrides), env, debug=False)
            if env.source == "torchrun":
                stop_with_parent()
            stop = StopRequest(parse_signals(cfg.preempt.signals), hard_exit=False).install()
            _RUNNING.append(stop)
            try:
                return execute(cfg, env, stop, trust_checkpoint=trust_checkpoint)
            finally:
                _RUNNING.remove(stop)
                stop.uninstall()
    finally:
        _TRAINING.release()


def evaluate(checkpoint: str | Path, config: str | Path | Mapping[str, Any] | None = None, *, ema: bool = False,
             tta: str | None = None, trust_checkpoint: bool = False, **overrides: Any) -> dict[str, Any]:
    """Exact validation of ``checkpoint`` (its EMA weights with ``ema``; ``tta="flip"``: the mean
    logits of each image and its mirror, default ``train.val_tta``): ``{"val_loss", "val_acc",
    "val_acc5", "count", "per_class_acc"}``, what ``ddp-trainer evaluate --json`` prints. The data and
    model come from the checkpoint's stored config, overridden by what ``config`` sets (a YAML file or a
    mapping: only its keys; a Config: used whole) and by ``overrides``; a ``model.name`` given there
    is the one built.
    Under torchrun every rank evaluates its share and gets the whole result."""
    env = resolve(os.environ)
    with console_logging(env.rank), launched(env, mode_request="auto", backend="auto", timeout_s=300.0) as (dist, _):
        loaded = dist.main_then_broadcast(lambda: _for_evaluation(read_checkpoint(checkpoint, trust_checkpoint), ema))
        cfg, name = evaluation_model(loaded, config, overrides)
        if loaded.model_name and name != loaded.model_name:
            log.info("evaluate: model.name=%s (the checkpoint was trained as %s)", name, loaded.model_name)
        splits = build_splits(cfg, dist)
        if loaded.class_to_idx is not None and dict(loaded.class_to_idx) != splits.class_to_idx:
            raise CheckpointError(f"checkpoint '{checkpoint}' classes {list(loaded.class_to_idx)} differ "
                                  f"from the data's {list(splits.classes)}; point data.root at its dataset")
        # without the run's drop rates: evaluation runs in eval mode, where they change nothing,
        # and an overridden model.name need not have the stored model's settings
        model = build_model(name, len(splits.classes))
        other = f" (trained as model.name={loaded.model_name}, evaluated as {name})" if name != loaded.model_name \
            and loaded.model_name else ""
        load_weights(model, loaded.weights(ema), source=f"checkpoint '{checkpoint}'{other}")
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


STORED_SECTIONS = ("data", "model", "seed", "train")  # what evaluate takes from the checkpoint's config


def _for_evaluation(found: Checkpoint, ema: bool) -> Checkpoint:
    """``found`` with only what an evaluation reads (the weights, the config, the classes, the model
    name): rank 0 broadcasts it, so no optimizer state or generator states travel."""
    keep = ("model", "config", "class_to_idx", "model_name", *(("model_ema",) if ema else ()))
    return Checkpoint(found.path, found.kind, {k: found.entries[k] for k in keep if k in found.entries},
                      found.renamed, found.layout)


def _names_model(values: Mapping[str, Any]) -> bool:
    section = values.get("model")
    return "model.name" in values or (isinstance(section, Mapping) and "name" in section)


def _evaluation_config(loaded: Checkpoint, config: str | Path | Mapping[str, Any] | Config | None,
                       overrides: Mapping[str, Any]) -> tuple[Config, bool]:
    """The config an evaluation runs with: the checkpoint's stored data / model / seed / train
    sections, overridden by what ``config`` sets (a YAML file or a mapping: only its keys; a Config:
    all of it) and then by ``overrides``. Also: whether a model name was set there, by the caller or
    the stored config (else the file's own ``model_name`` is used)."""
    stored = {k: v for k, v in (loaded.config or {}).items() if k in STORED_SECTIONS}
    if isinstance(config, Config):
        return build(config, overrides), True
    if config is None:
        given: dict[str, Any] = {}
    elif isinstance(config, Mapping):
        given = dict(config)
    else:
        build(config)  # the file's own errors, with its name
        given = read_yaml(config)
    named = any(_names_model(v) for v in (stored, given, overrides))
    return build(stored, {**given, **overrides}), named


def evaluation_model(loaded: Checkpoint, config: str | Path | Mapping[str, Any] | Config | None,
                     overrides: Mapping[str, Any]) -> tuple[Config, str]:
    """The config an evaluation of ``loaded`` runs with (see :func:`_evaluation_config`) and the model
    name it builds: one named there, else the file's own ``model_name``, else the default."""
    cfg, named = _evaluation_config(loaded, config, overrides)
    return cfg, cfg.model.name if named else loaded.model_name or cfg.model.name


def dumps(metrics: Mapping[str, Any]) -> str:
    """``evaluate``'s result as the command line prints it with ``--json``."""
    return json.dumps(dict(metrics))
