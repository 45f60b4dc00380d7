"""Assembling a run: output folder, data, the checkpoint to resume, model, optimizer and the other
pieces of state (each registered as a checkpoint component where it is built), then the wrapped
model, the loaders and the engine, handed to a :class:`~.trainer.Trainer`.

Order matters and is deliberate: nothing is written to ``output_dir`` before it is locked and the
run has decided how it starts (the checkpoint read and restored, so that a refused resume changes
nothing); a checkpoint is read by rank 0 only, then broadcast, and restored into the unwrapped
model (before DDP / DataParallel / compile wrap it).
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch import nn

from ..checkpoint.policy import CheckpointManager
from ..checkpoint.registry import LoadContext, StateRegistry
from ..config import Config
from ..data import decode
from ..data.datasets import build_splits
from ..data.loaders import build_run_data, sampler_spec
from ..data.mixing import BatchMixer
from ..data.transforms import Normalize
from ..errors import ConfigError, DataError
from ..launch.dist import Dist
from ..launch.mode import ModeDecision, prepare, wrap
from ..launch.signals import StopRequest, worker_init_ignoring
from ..models import build_model
from ..trackers import EpochSink, RayReport, start_trackers
from .components import (
    LoopState,
    ModelWeights,
    OptimizerState,
    RngState,
    RunMeta,
    ScalerState,
    TrackerRuns,
    SamplerCheck,
    TrainingSetCheck,
)
from .ema import WeightEMA, ema_schedule
from .engine import Engine, RunningLoss
from .optim import LRSchedule, build_optimizer, scaled_lr
from .report import EpochReport
from .resume import apply_initial_weights, find_resume, read_initial_weights
from .losses import training_loss
from .run_folder import RunFolder
from .state import TrainState
from .trainer import Trainer

log = logging.getLogger("ddp_trainer")


def check_trainable(n: int, world: int, batch_size: int, model: nn.Module, num_classes: int, monitor: str) -> None:
    """Refuse, before training, what cannot train: fewer than two classes, a training set or batch
    that BatchNorm or the ranks cannot use, a monitored metric the classes cannot give. Every rank
    checks the same figures, so only rank 0 prints the error (``shared``)."""
    if num_classes < 2:
        raise DataError(f"the data has {num_classes} class; a classifier needs 2 or more class folders", shared=True)
    if monitor == "val_acc5" and num_classes < 5:
        raise ConfigError(f"checkpoint.monitor=val_acc5 needs 5 or more classes (the data has {num_classes}, so no "
                          f"top-5 accuracy is measured); monitor val_acc or val_loss", shared=True)
    if n < 2 * world:
        raise DataError(f"the training set has {n} image(s), fewer than 2 per process for {world} process(es); "
                        f"add images or run fewer processes", shared=True)
    if batch_size == 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError("data.batch_size=1 with a model that has BatchNorm layers: BatchNorm cannot train on "
                          "one sample; use data.batch_size=2 or more", shared=True)


def apply_numerics(cfg: Config, device: torch.device) -> None:
    """``train.deterministic`` and ``train.tf32`` (before any matmul: cuBLAS reads its workspace
    setting once). TF32 is a GPU matter: on the CPU torch's default precision stays."""
    strict = cfg.train.deterministic is not False
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not strict  # fastest kernels unless asked not to
        torch.set_float32_matmul_precision("high" if cfg.train.tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    if strict:
        # cuBLAS is deterministic only with a fixed workspace (CUDA's documentation); kept if set
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=cfg.train.deterministic == "warn")
        torch.backends.cudnn.deterministic = True


def build_trainer(cfg: Config, dist: Dist, decision: ModeDecision, *, stop: StopRequest,
                  trust_checkpoint: bool = False, max_steps_per_epoch: int | None = None,
                  scratch: bool = False) -> Trainer:
    """Every rank builds the same run (the collectives inside run on every rank, in the same order).
    A build that fails lets go of what it took (the lock, loader workers) before raising."""
    folder = RunFolder(cfg, dist, scratch)  # scratch: --debug's own folder
    with contextlib.ExitStack() as undo:
        undo.callback(folder.close)
        folder.claim()
        decode.use(cfg.data.decoder)  # before any loader worker forks: they inherit the choice
        splits = build_splits(cfg, dist)
        num_classes = len(splits.classes)
        log.info("data: %d train / %d val images, %d classes; val from %s; decoder %s", len(splits.train),
                 len(splits.val), num_classes, splits.source, decode.decoder_name(cfg.data.reduced_decode))
        for key, value in cfg.taken_from_model:
            log.info("data.from_model: data.%s=%s from %s's pretrained config", key, value, cfg.model.name)
        sampler = sampler_spec(cfg.data, splits.train)
        with dist.waiting("rank 0 to read the checkpoint"):
            resume = dist.main_then_broadcast(
                lambda: find_resume(cfg, folder.checkpoints, splits.class_to_idx, trust_checkpoint))
            starts_from = cfg.model.init_from or cfg.model.weights
            init = (dist.main_then_broadcast(lambda: read_initial_weights(cfg, trust_checkpoint))
                    if starts_from and resume is None else None)

        apply_numerics(cfg, dist.device)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
        model = build_model(cfg.model.name, num_classes, drop_rate=cfg.model.drop_rate,
                            drop_path_rate=cfg.model.drop_path_rate)
        check_trainable(len(splits.train), dist.world_size, cfg.data.batch_size, model, num_classes,
                        cfg.checkpoint.monitor)
        if init is not None:
            apply_initial_weights(model, init, cfg.model.name)
        model = prepare(model.to(dist.device), decision, sync_batchnorm=cfg.model.sync_batchnorm,
                        channels_last=cfg.train.channels_last)
        global_batch = cfg.data.batch_size * dist.world_size * cfg.train.grad_accum_steps
        base_lr = scaled_lr(cfg.optim, global_batch)
        if cfg.optim.lr_scale == "linear":
            log.info("optim.lr_scale=linear: lr %g x global batch %d / 256 = %g", cfg.optim.lr, global_batch, base_lr)

        # the checkpoint's components, in the order they are saved and restored
        registry = StateRegistry()
        registry.register("meta", RunMeta(cfg, splits.class_to_idx, dist.world_size), flat=True)
        registry.register("model", ModelWeights(model))
        optimizer = build_optimizer(model, cfg.optim, base_lr)
        registry.register("optimizer", OptimizerState(optimizer, cfg.optim, model))
        schedule = LRSchedule(base_lr, cfg.sched, cfg.train.epochs)
        registry.register("scheduler", schedule)
        scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.train.precision == "fp16")
        registry.register("scaler", ScalerState(scaler))
        running = RunningLoss(dist.device)
        loop = LoopState(TrainState(), running, dist)
        registry.register("train_state", loop, every_rank=True, flat=True)
        check = TrainingSetCheck(splits.train.fingerprint(), loop.state, cfg.checkpoint.on_data_change)
        registry.register("train_data", check)  # after train_state: needs the position
        registry.register("train_order", SamplerCheck(sampler.identity(dist.world_size), loop.state), flat=True)
        gpus = (list(range(decision.gpus)) if decision.mode == "dp"
                else [dist.device.index or 0] if dist.device.type == "cuda" else [])
        registry.register("rng", RngState(dist, cfg.seed, gpus), every_rank=True, flat=True)
        ema = None
        if cfg.train.ema_decay is not None:
            t = cfg.train
            decay, copy_before = ema_schedule(t.ema_decay, t.ema_every_steps, t.ema_decay_adjust, global_batch,
                                              t.epochs, cfg.sched.warmup_epochs)
            ema = WeightEMA(model, decay, t.ema_every_steps, copy_before)
            if t.ema_decay_adjust != "none" or t.ema_every_steps > 1:
                log.info("EMA: an update every %d step(s) with decay %.8g%s", t.ema_every_steps, decay,
                         f", copying the weights before epoch {copy_before:g} (warmup)" if copy_before else "")
        if ema is not None:
            registry.register("model_ema", ema)
        runs = TrackerRuns()
        if cfg.log.wandb or cfg.log.mlflow:
            registry.register("trackers", runs)
        checkpoints = CheckpointManager(cfg.checkpoint, folder.checkpoints, dist, registry, cfg.train.epochs)
        if resume is not None:  # before wrapping: canonical keys, CPU tensors
            restored = registry.load_state_dict(LoadContext(resume, dist.world_size, dist.rank))
            if ema is not None and "model_ema" not in restored:
                log.warning("resume: %s holds no EMA weights; train.ema_decay starts a new EMA from the resumed "
                            "weights", resume.path)
        # opened only now: a model, optimizer state or weights refused above leave output_dir as it was
        folder.open()
        checkpoints.open()
        if resume is not None:
            checkpoints.keep_replaced_best()
        if dist.is_main:  # after the restore: a resumed run continues its tracker runs
            runs.trackers = start_trackers(cfg, folder.path, runs.resumed)
        sinks: list[EpochSink] = [*runs.trackers, *([RayReport()] if dist.env.source == "ray" else [])]
        undo.callback(lambda: [s.close(False) for s in sinks])

        mixer = (BatchMixer(num_classes, cfg.data.mixup_alpha, cfg.data.cutmix_alpha, cfg.seed, dist.rank)
                 if cfg.data.mixup_alpha or cfg.data.cutmix_alpha else None)
        # DataParallel: each replica normalises its own uint8 chunk (mixing needs float images first)
        on_replicas = decision.mode == "dp" and mixer is None
        per_replica = Normalize(cfg.data.mean, cfg.data.std, cfg.train.channels_last) if on_replicas else None
        model = wrap(model, decision, dist.device, dist.gradient_watch, per_replica)
        if cfg.train.compile:
            model = torch.compile(model)
        data = build_run_data(cfg, dist, splits, sampler, worker_init_fn=worker_init_ignoring(stop.signals),
                              before_fork=checkpoints.wait_local)  # no worker forks while a save is in flight
        undo.callback(data.close)
        engine = Engine(model, optimizer, Normalize(cfg.data.mean, cfg.data.std).to(dist.device), dist.device,
                        cfg.train.precision, cfg.train.clip_grad_norm, cfg.train.channels_last, scaler,
                        label_smoothing=cfg.train.label_smoothing, mixer=mixer, dist=dist, running=running,
                        replicas_prepare=on_replicas, loss=training_loss(cfg.train))
        report = EpochReport(cfg, dist, folder, sinks)
        report.keep_rows_before(loop.state.epoch, resumed=resume is not None)
        log.info("model %s (%.2fM parameters); global batch %d = %d per process x %d process(es) x %d "
                 "accumulation step(s); optimizer %s lr=%g", cfg.model.name,
                 sum(p.numel() for p in model.parameters()) / 1e6, global_batch, cfg.data.batch_size,
                 dist.world_size, cfg.train.grad_accum_steps, cfg.optim.name, base_lr)
        undo.pop_all()  # the trainer owns them now
        return Trainer(cfg, dist, folder=folder, loop=loop, model=model, ema=ema, schedule=schedule,
                       engine=engine, data=data, checkpoints=checkpoints, report=report, stop=stop,
                       max_steps_per_epoch=max_steps_per_epoch)
