"""One training run in this process, from a validated config to its exit code: the launch session
(process group, mode, device), the trainer, and the end of the run on every path."""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..errors import EXIT_OK, ConfigError
from ..launch.dist import Dist
from ..launch.environment import LaunchEnv
from ..launch.mode import ModeDecision
from ..launch.session import launched
from ..launch.signals import Preempted, StopRequest, parse_signals
from ..models import check_input_size, check_model_name
from ..runlog import close_file_logs
from .build import build_trainer
from .run_folder import NCCL_TRACE
from .trainer import FitResult

log = logging.getLogger("ddp_trainer")


def debug_config(cfg: Config) -> Config:
    """``--debug``: one process, one device, no loader workers, a short run into ``<output_dir>.debug``."""
    return cfg.replace(**{
        "output_dir": str(Path(cfg.output_dir)) + ".debug", "resume": "none", "overwrite": True,
        "dist.mode": "single", "data.num_workers": 0, "train.epochs": cfg.debug.epochs,
        "train.log_every_steps": 1, "train.compile": False})


def check_config(cfg: Config, env: LaunchEnv, debug: bool) -> Config:
    """What only this launch can tell about the config (after :func:`~ddp_trainer.config.load`): the
    run's config, ``--debug`` applied. Every rank sees the same argv and files, so the errors are
    ``shared``: only rank 0 prints them."""
    try:
        if debug:
            if env.world_size > 1:
                raise ConfigError("--debug runs one process; start it with 'python launch.py --debug', not torchrun")
            cfg = debug_config(cfg)
        check_model_name(cfg.model.name, drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate)
        check_input_size(cfg.model.name, cfg.data.input_sides())
    except ConfigError as exc:
        exc.shared = True
        raise
    return cfg


@dataclass(frozen=True)
class RunResult:
    """What a training run ended with, on every rank (its files are on global rank 0's node)."""

    output_dir: Path
    config: Config
    epochs_run: int  # epochs this call trained (0: train.epochs was reached already)
    final: dict[str, Any] | None  # the last epoch's metrics row (None: nothing was left to train)
    best: float | None  # the best checkpoint.monitor value of the run so far
    monitor: str
    checkpoints: dict[str, Any]  # "last", "best": paths (None when absent); "epochs": epoch files

    @classmethod
    def of(cls, cfg: Config, fit: FitResult, best: float | None) -> "RunResult":
        folder = Path(cfg.output_dir) / "checkpoints"
        files = {name: (folder / f"{name}.pt" if (folder / f"{name}.pt").exists() else None)
                 for name in ("last", "best")}
        epochs = sorted(folder.glob("epoch_*.pt")) if folder.is_dir() else []
        return cls(fit.output_dir, cfg, fit.epochs_run, fit.last_row, best, cfg.checkpoint.monitor,
                   {**files, "epochs": epochs})


def execute(cfg: Config, env: LaunchEnv, stop: StopRequest, *, debug: bool = False,
            trust_checkpoint: bool = False) -> RunResult:
    """Train as ``cfg`` says. ``stop``: the stop-signal handling of this process; its signals become
    ``preempt.signals`` here, before any loader worker exists (the workers ignore them). Raises
    Preempted when a stop signal ended the run at a checkpoint, a UserError for bad input."""
    stop.configure(parse_signals(cfg.preempt.signals), cfg.preempt.orphan_deadline_s)
    try:
        session = launched(env, cfg.dist.mode, cfg.dist.backend, cfg.dist.timeout_s, cfg.dist.init_timeout_s,
                           trace_dir=Path(cfg.output_dir) / NCCL_TRACE)
        with session as (dist, decision):
            return _train(cfg, dist, decision, stop, debug, trust_checkpoint)
    finally:
        stop.finish()
        close_file_logs()


def run_training(cfg: Config, env: LaunchEnv, stop: StopRequest, *, debug: bool = False,
                 trust_checkpoint: bool = False) -> int:
    """:func:`execute` for the command line: its exit code (0, or the stop's code after a checkpoint)."""
    try:
        execute(cfg, env, stop, debug=debug, trust_checkpoint=trust_checkpoint)
    except Preempted as exc:
        if env.rank == 0:
            log.warning("%s", exc)
        return exc.exit_code
    return EXIT_OK


def _train(cfg: Config, dist: Dist, decision: ModeDecision, stop: StopRequest, debug: bool,
           trust_checkpoint: bool) -> RunResult:
    """Build and fit, then let go of everything the run built, whatever happened: DDP's wrapper (its
    reducer and communication hook hold the process group and Python objects) must be destroyed while
    the interpreter runs and before the process group is. Left to interpreter shutdown, destroying it
    aborted the process ("terminate called without an active exception", 4 runs in 20 of a 2-rank
    gloo job)."""
    trainer = None
    try:
        if debug:
            # with fp16 the grad scaler's overflow steps hold inf/nan gradients by design (the step
            # is skipped and the scale lowered): anomaly mode must not call them errors
            check_nan = cfg.train.precision != "fp16"
            torch.autograd.set_detect_anomaly(True, check_nan=check_nan)
            log.info("debug: one process on %s, num_workers=0, anomaly detection on%s, %d step(s) x %d "
                     "epoch(s), output in %s", dist.device, "" if check_nan else " (no nan check: fp16)",
                     cfg.debug.steps_per_epoch, cfg.train.epochs, cfg.output_dir)
        trainer = build_trainer(cfg, dist, decision, stop=stop, trust_checkpoint=trust_checkpoint,
                                max_steps_per_epoch=cfg.debug.steps_per_epoch if debug else None,
                                scratch=debug)
        with dist.training():
            result = trainer.fit()
        if result.last_val is not None:
            log.info("done: val_loss=%.4f val_acc=%.4f in %s", result.last_val.loss, result.last_val.acc,
                     result.output_dir)
        else:
            log.info("done: nothing left to train (train.epochs=%d reached) in %s", cfg.train.epochs,
                     result.output_dir)
        if stop.received:
            log.info("%s arrived after the last training step: the run is complete, nothing to stop or "
                     "requeue", stop.received)
        return RunResult.of(cfg, result, trainer.checkpoints.ranking.best)
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        gc.collect()  # DDP's modules sit in reference cycles: collected now, not at interpreter shutdown
