"""One training run in this process, from a validated config to its exit code: the launch session
(process group, mode, device), the trainer, and the end of the run on every path."""
from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

from ..config import Config
from ..errors import EXIT_OK, ConfigError
from ..launch.dist import Dist
from ..launch.environment import LaunchEnv
from ..launch.mode import ModeDecision
from ..launch.session import launched
from ..launch.signals import Preempted, StopRequest, parse_signals
from ..models import check_model_name
from ..runlog import close_file_logs
from .build import build_trainer
from .run_folder import NCCL_TRACE

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
        check_model_name(cfg.model.name)
    except ConfigError as exc:
        exc.shared = True
        raise
    return cfg


def run_training(cfg: Config, env: LaunchEnv, stop: StopRequest, *, debug: bool = False,
                 trust_checkpoint: bool = False) -> int:
    """Train as ``cfg`` says; the exit code (0, or the stop's code after a checkpoint). ``stop``: the
    stop-signal handling installed at process start; its signals become ``preempt.signals`` here,
    before any loader worker exists (the workers ignore them)."""
    stop.configure(parse_signals(cfg.preempt.signals), cfg.preempt.orphan_deadline_s)
    try:
        session = launched(env, cfg.dist.mode, cfg.dist.backend, cfg.dist.timeout_s, cfg.dist.init_timeout_s,
                           trace_dir=Path(cfg.output_dir) / NCCL_TRACE)
        with session as (dist, decision):
            _train(cfg, dist, decision, stop, debug, trust_checkpoint)
    except Preempted as exc:
        if env.rank == 0:
            log.warning("%s", exc)
        return exc.exit_code
    finally:
        stop.finish()
        close_file_logs()
    return EXIT_OK


def _train(cfg: Config, dist: Dist, decision: ModeDecision, stop: StopRequest, debug: bool,
           trust_checkpoint: bool) -> None:
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
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        gc.collect()  # DDP's modules sit in reference cycles: collected now, not at interpreter shutdown
