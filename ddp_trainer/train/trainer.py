"""The Trainer: builds everything from a config and a live :class:`Dist`, owns the loop state, and
runs epochs -> steps -> exact validation -> checkpoint -> metrics.

Rank-0 decisions are made when objects are built: only global rank 0 gets a checkpoint writer and a
metrics file (other ranks hold ``None`` and skip the write), every rank runs the same collectives.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import config as config_mod
from .. import pretrained
from ..checkpoint.reader import (FORMAT, FORMAT_VERSION, Loaded, canonical_state_dict, has_checkpoints, load_weights,
                         read_checkpoint, resume_candidates)
from ..checkpoint.policy import CheckpointManager
from ..config import Config
from ..data.datasets import (FolderDataset, LoaderOwner, Splits, build_splits, eval_transform, make_eval_loader,
                   make_train_loader, train_transform, with_decoded_cache)
from ..launch.dist import Dist
from .ema import WeightEMA
from ..data.mixing import BatchMixer
from .engine import Engine, EvalResult, evaluate
from ..errors import CheckpointError, ConfigError, DataError, NonFiniteLoss, UserError
from ..models import build_model, classifier_head
from .optim import LRSchedule, build_optimizer, carry_over_state, optimizer_family, scaled_lr
from ..launch.mode import ModeDecision, prepare, unwrap, wrap
from ..progress import Progress, Scalars, use_progress_bar
from ..launch.signals import Preempted, StopRequest, clear_marker, worker_init_ignoring, write_marker
from ..launch.runlock import RunLock
from ..runlog import EarlyRecords, MetricsFile, add_file_log
from ..data.samplers import EpochPlan, PlanBatchSampler
from ..checkpoint.registry import StateRegistry, TrainState
from ..data.transforms import Normalize

log = logging.getLogger("ddp_trainer")


@dataclass
class FitResult:
    epochs_run: int
    last_val: EvalResult | None
    output_dir: Path


@dataclass
class EpochFigures:
    """What one epoch's training pass measured (``_train_epoch`` -> ``_finish_epoch``)."""

    epoch: int
    train_loss: float
    lr: float
    images: int  # samples trained in this process's pass over the epoch (all ranks)
    train_time_s: float
    data_wait_s: float
    started: float  # perf_counter at the start of the pass


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def config_differences(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value changed (resume diagnostics)."""
    if not old:
        return []
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _peak_rss_mb() -> int:
    """This process's peak resident memory in MiB (loader workers not included)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def check_trainable(n: int, world: int, batch_size: int, model: nn.Module) -> None:
    """Refuse, before training, a training set or batch that BatchNorm or the ranks cannot use.
    Every rank checks the same figures, so only rank 0 prints the error (``shared``)."""
    if n < 2 * world:
        raise DataError(f"the training set has {n} image(s), fewer than 2 per process for {world} process(es); "
                        f"add images or run fewer processes", shared=True)
    if batch_size == 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError("data.batch_size=1 with a model that has BatchNorm layers: BatchNorm cannot train on "
                          "one sample; use data.batch_size=2 or more", shared=True)


_WRITE_FAILED = 1 << 20  # in the stop agreement: rank 0's last background checkpoint write failed
_NEVER = 1 << 62  # the non-finite agreement sends NEVER - step, so the max over ranks is the earliest step

# what a run writes in output_dir, and whether each is a folder
OUTPUT_ENTRIES = {"checkpoints": True, "tensorboard": True, "train.log": False, "metrics.jsonl": False,
                  "config.yaml": False, "PREEMPTED": False, ".lock": False}


def check_output_layout(out: Path) -> None:
    """Refuse (exit 2, before anything is written) an output_dir where a name the run writes is taken
    by the wrong kind of entry: ``checkpoints`` a file, ``train.log`` a folder, output_dir a file."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir '{out}' is a file, not a folder; choose another output_dir", shared=True)
    for name, folder in OUTPUT_ENTRIES.items():
        path = out / name
        if path.exists() and path.is_dir() != folder:
            want, found = ("a folder", "a file") if folder else ("a file", "a folder")
            raise ConfigError(f"'{path}' is {found}, but the run writes {want} there; move it out of "
                              f"output_dir '{out}' or choose another output_dir", shared=True)


class Trainer:
    """Build with :meth:`build`, then call :meth:`fit`; :meth:`close` on every exit path."""

    def __init__(self, cfg: Config, dist: Dist, decision: ModeDecision, *, trust_checkpoint: bool = False,
                 max_steps_per_epoch: int | None = None, stop: StopRequest | None = None) -> None:
        self.cfg = cfg
        self.dist = dist
        self.decision = decision
        self.device = dist.device
        self.trust = trust_checkpoint
        self.max_steps = max_steps_per_epoch
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.state = TrainState()
        self.components = StateRegistry()
        self.stop = stop or StopRequest([])
        self._stop_name = ""  # the signal the ranks agreed on
        self._epoch_complete = False  # what the next save records
        self.loaders = LoaderOwner(before_fork=self._before_worker_fork)
        self._resuming: Loaded | None = None  # the checkpoint being restored, during build()
        self.lock: RunLock | None = None  # rank 0: output_dir's lock, held until the process ends
        self._early_log: EarlyRecords | None = None  # rank 0: log records before train.log opens
        self._fingerprint: dict[str, Any] = {}  # the training index's count and hash (checked on resume)
        # built by build():
        self.splits: Splits | None = None
        self.num_classes = 0
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.normalize: Normalize | None = None
        self.schedule: LRSchedule | None = None
        self.train_set: FolderDataset | None = None
        self.val_set: FolderDataset | None = None
        self.train_loader: Any = None
        self.batches: PlanBatchSampler | None = None
        self.val_loader: Any = None
        self.engine: Engine | None = None
        self.checkpoints: CheckpointManager | None = None
        self.metrics: MetricsFile | None = None
        self.show_bar = False
        self.scalars: Scalars | None = None

    # -- building ------------------------------------------------------------------------------

    def build(self) -> "Trainer":
        cfg, dist = self.cfg, self.dist
        # nothing in output_dir is written before the run holds its lock and has decided how it
        # starts: a refused or mistaken run leaves the folder as it was
        self._early_log = EarlyRecords() if dist.is_main else None
        with dist.waiting("rank 0 to lock output_dir"):
            dist.main_then_broadcast(self._lock_output_dir)
        self.splits = build_splits(cfg, dist)
        self._fingerprint = self.splits.train.fingerprint()
        self.num_classes = len(self.splits.classes)
        log.info("data: %d train / %d val images, %d classes; val from %s", len(self.splits.train),
                 len(self.splits.val), self.num_classes, self.splits.source)
        with dist.waiting("rank 0 to read the checkpoint"):
            resume = dist.main_then_broadcast(self._find_resume)
            starts_from = cfg.model.init_from or cfg.model.weights
            init = dist.main_then_broadcast(self._read_init_from) if starts_from and resume is None else None
        with dist.waiting("rank 0 to prepare output_dir"):
            dist.main_then_broadcast(self._prepare_output_dir)

        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.train.deterministic  # fastest kernels unless asked not to
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
        torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
        model = build_model(cfg.model.name, self.num_classes)
        check_trainable(len(self.splits.train), dist.world_size, cfg.data.batch_size, model)
        if init is not None:
            self._apply_init(model, init)
        model = prepare(model.to(self.device), self.decision, sync_batchnorm=cfg.model.sync_batchnorm,
                        channels_last=cfg.train.channels_last)
        self.model = model
        global_batch = cfg.data.batch_size * dist.world_size * cfg.train.grad_accum_steps
        base_lr = scaled_lr(cfg.optim, global_batch)
        if cfg.optim.lr_scale == "linear":
            log.info("optim.lr_scale=linear: lr %g x global batch %d / 256 = %g", cfg.optim.lr, global_batch, base_lr)
        self.optimizer = build_optimizer(model, cfg.optim, base_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.schedule = LRSchedule(base_lr, cfg.sched, cfg.train.epochs)
        self.ema = WeightEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
        self._register_components()
        if resume is not None:  # before wrapping: canonical keys, CPU tensors
            self._resuming = resume
            self.components.load_state_dict(resume.entries)
            self._resuming = None
            if resume.rng is None or len(resume.rng) != dist.world_size:
                torch.manual_seed(cfg.seed + 1000 * dist.rank + self.state.step)
        model = wrap(model, self.decision, self.device, dist.gradient_watch)
        if cfg.train.compile:
            model = torch.compile(model)
        self.model = model
        self.normalize = Normalize(cfg.data.mean, cfg.data.std).to(self.device)

        seed = cfg.seed
        self.train_set = FolderDataset(self.splits.train, train_transform(cfg.data), seed,
                                       with_decoded_cache(self.splits.train, cfg.data, dist, cfg.data.train_cache_size))
        val_cache = with_decoded_cache(self.splits.val, cfg.data, dist, cfg.data.image_size, cfg.data.val_resize)
        self.val_set = FolderDataset(self.splits.val, eval_transform(cfg.data, cached=val_cache is not None), seed,
                                     val_cache)
        init_fn = worker_init_ignoring(self.stop.signals)
        self.train_loader, self.batches = make_train_loader(self.train_set, cfg.data, self.device, worker_init_fn=init_fn)
        self.val_loader = make_eval_loader(self.val_set, cfg.data, dist, self.device, worker_init_fn=init_fn)
        self.engine = Engine(model, self.optimizer, self.normalize, self.device, cfg.train.precision,
                             cfg.train.clip_grad_norm, cfg.train.channels_last, self.scaler,
                             label_smoothing=cfg.train.label_smoothing, mixer=self._mixer(), dist=dist)
        self.checkpoints = CheckpointManager(cfg.checkpoint, self.ckpt_dir, dist, self.components, cfg.train.epochs)
        self.metrics = MetricsFile(self.out / "metrics.jsonl") if dist.is_main else None
        show_bar = {"on": dist.is_main, "off": False}.get(cfg.log.progress, use_progress_bar(dist.is_main))
        self.show_bar = show_bar
        self.scalars = Scalars(cfg.log.tensorboard and dist.is_main, str(self.out / "tensorboard"))
        if self.metrics is not None:
            kept = self.metrics.cut_back(self.state.epoch)
            if resume is not None:
                log.info("metrics.jsonl: kept %d row(s) before epoch %d", kept, self.state.epoch)
        log.info("model %s (%.2fM parameters); global batch %d = %d per process x %d process(es) x %d "
                 "accumulation step(s); optimizer %s lr=%g", cfg.model.name,
                 sum(p.numel() for p in model.parameters()) / 1e6, global_batch, cfg.data.batch_size,
                 dist.world_size, cfg.train.grad_accum_steps, cfg.optim.name, base_lr)
        return self

    def _mixer(self) -> BatchMixer | None:
        data = self.cfg.data
        if not (data.mixup_alpha or data.cutmix_alpha):
            return None
        return BatchMixer(self.num_classes, data.mixup_alpha, data.cutmix_alpha, self.cfg.seed, self.dist.rank)

    def _register_components(self) -> None:
        """The checkpoint's pieces, in the order they are saved and restored (one line each)."""
        reg = self.components
        reg.register("meta", self._meta, flat=True)
        reg.register("model", lambda: canonical_state_dict(self.model), self._load_model)
        reg.register("optimizer", lambda: self.optimizer.state_dict(), self._load_optimizer)
        reg.register("scheduler", lambda: self.schedule.state_dict())  # a function of config + progress
        reg.register("scaler", lambda: self.scaler.state_dict() if self.scaler.is_enabled() else None,
                     self._load_scaler)
        reg.register("train_state", self._train_state_entries, self.state.load_state_dict, every_rank=True, flat=True)
        reg.register("train_data", lambda: self._fingerprint, self._check_data)  # after train_state: needs position
        reg.register("rng", lambda: self.dist.all_gather_object(self._rng_state()), self._load_rng, every_rank=True)
        if self.ema is not None:
            reg.register("model_ema", self.ema.state_dict, self.ema.load_state_dict)

    def _lock_output_dir(self) -> None:
        """Rank 0: refuse to clobber a run, then hold output_dir's lock for the whole run."""
        cfg = self.cfg
        check_output_layout(self.out)
        if cfg.resume == "none" and has_checkpoints(self.ckpt_dir) and not cfg.overwrite:
            raise CheckpointError(
                f"output_dir '{self.out}' already holds checkpoints and resume=none would overwrite them; "
                f"use resume=auto to continue that run, another output_dir, or overwrite=true")
        try:
            self.lock = RunLock(self.out).acquire()
        except OSError as exc:
            raise UserError(f"output_dir '{self.out}' cannot be written ({exc.strerror}); choose a writable "
                            f"output_dir") from None

    def _prepare_output_dir(self) -> None:
        """Rank 0: save the resolved config, start train.log, clear an old stop marker."""
        cfg = self.cfg
        try:
            (self.out / "config.yaml").write_text(config_mod.dump(cfg))
        except OSError as exc:
            raise UserError(f"output_dir '{self.out}' cannot be written ({exc.strerror}); choose a writable "
                            f"output_dir") from None
        add_file_log(self.out / "train.log", self.dist.rank, self._early_log)
        self._early_log = None
        clear_marker(self.out)

    def _find_resume(self) -> Loaded | None:
        """Rank 0: the checkpoint to resume from (validated against the config), or None."""
        cfg = self.cfg
        if cfg.resume == "none":
            return None
        if cfg.resume != "auto":
            loaded = read_checkpoint(cfg.resume, self.trust)
        else:
            loaded = None
            skipped = []
            for path in resume_candidates(self.ckpt_dir):
                try:
                    loaded = read_checkpoint(path, self.trust)
                    break
                except CheckpointError as exc:
                    log.warning("resume: skipping %s: %s", path.name, exc.message)
                    skipped.append(f"{path.name}: {exc.message}")
            if loaded is None and skipped:
                raise CheckpointError(
                    f"resume=auto: output_dir '{self.out}' holds checkpoints but none can be used "
                    f"({'; '.join(skipped)}); nothing was changed. To start over there: resume=none overwrite=true")
            if loaded is None:
                return None
        self._check_compatible(loaded)
        log.info("resume: from %s (%s format), epoch %d, %s", loaded.path, loaded.kind, loaded.start_epoch,
                 f"{loaded.start_position} samples into the epoch" if loaded.start_position else "from its start")
        for line in config_differences(loaded.config, cfg.to_dict()):
            log.info("resume: config changed: %s", line)
        return loaded

    def _check_compatible(self, loaded: Loaded) -> None:
        expected = self.splits.class_to_idx
        if loaded.class_to_idx is not None and dict(loaded.class_to_idx) != expected:
            a, b = list(loaded.class_to_idx), list(expected)
            diff = (f"checkpoint has {len(a)} classes, data has {len(b)}" if len(a) != len(b)
                    else f"first difference: {next((x, y) for x, y in zip(a, b) if x != y)}")
            raise CheckpointError(f"checkpoint '{loaded.path}' was trained on other classes than the data "
                                  f"({diff}); use the same data.classes, or model.init_from=PATH to fine-tune")
        if loaded.model_name is not None and loaded.model_name != self.cfg.model.name:
            raise CheckpointError(f"checkpoint '{loaded.path}' holds model {loaded.model_name!r} but "
                                  f"model.name={self.cfg.model.name!r}; set model.name={loaded.model_name}")

    def _read_init_from(self) -> Loaded:
        """Rank 0: the weights to start from (``model.init_from``, or ``model.weights`` from the hub cache)."""
        model = self.cfg.model
        if model.weights:
            found = pretrained.require(model.name, model.weights)
            log.info("model.weights=%s: %s from %s", model.weights, found.weights, found.path)
            return read_checkpoint(found.path)
        return read_checkpoint(model.init_from, self.trust)  # type: ignore[arg-type]

    def _apply_init(self, model: nn.Module, init: Loaded) -> None:
        head = classifier_head(model)
        sd = init.model
        skip: list[str] = []
        want = model.state_dict()
        if any(k in sd and tuple(sd[k].shape) != tuple(want[k].shape) for k in want if k.startswith(tuple(head))):
            skip = head
            log.info("model.init_from: class count differs; classifier head %s left new", ", ".join(head))
        load_weights(model, sd, skip_prefixes=skip, source=f"model.init_from '{init.path}'")
        log.info("model.init_from: weights loaded from %s", init.path)

    # -- components' save and load -------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "monitor": self.cfg.checkpoint.monitor,
                "class_to_idx": self.splits.class_to_idx, "model_name": self.cfg.model.name,
                "config": self.cfg.to_dict(), "world_size": self.dist.world_size,
                "torch_version": str(torch.__version__)}

    def _load_model(self, sd: dict[str, torch.Tensor]) -> None:
        load_weights(self.model, sd, source=f"checkpoint '{self._resuming.path}'")

    def _load_optimizer(self, sd: dict[str, Any]) -> None:
        """Our own checkpoints: the whole state. Another trainer's: its per-parameter state (momentum
        buffers, Adam moments, step) carried into our parameter groups when the optimizer type
        matches and the parameters map (count and shapes); hyperparameters come from the config."""
        resuming = self._resuming
        want = self.cfg.optim.name
        if resuming.kind != "ddp_trainer":
            family = optimizer_family(sd)
            carried = carry_over_state(sd, self.optimizer, list(unwrap(self.model).parameters())) \
                if family == want else None
            if carried is None:
                why = (f"it is {family or 'of an unknown type'}, optim.name={want}" if family != want
                       else "its parameters do not map onto the model's (count or shapes differ)")
                log.warning("resume: optimizer state of the %s file skipped (%s)", resuming.kind, why)
            else:
                log.info("resume: %s optimizer state of the %s file carried over for %d parameter(s); "
                         "hyperparameters from the config", want, resuming.kind, carried)
            return
        old_name = (resuming.config or {}).get("optim", {}).get("name", want)
        try:
            if old_name != want:
                raise ValueError(f"checkpoint optimizer {old_name!r} != optim.name {want!r}")
            self.optimizer.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError) as exc:
            log.warning("resume: optimizer state skipped, it does not fit the configured optimizer (%s)", exc)

    def _load_scaler(self, sd: dict[str, Any]) -> None:
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(sd)

    def _train_state_entries(self) -> dict[str, Any]:
        loss_sum, loss_count = self._epoch_loss_sums()
        return self.state.state_dict(epoch_complete=self._epoch_complete, loss_sum=loss_sum, loss_count=loss_count)

    def _epoch_loss_sums(self) -> tuple[float, float]:
        """The epoch's training-loss sum and count so far, over every rank (a collective)."""
        running = self.engine.running
        sums = torch.stack([running.loss_sum, running.count])
        self.dist.all_reduce_sum(sums)
        return self.state.loss_sum + sums[0].item(), self.state.loss_count + sums[1].item()

    def _check_data(self, saved: dict[str, Any]) -> None:
        """A mid-epoch resume continues the epoch's order by position: only valid on the same
        training set. Otherwise restart the epoch's order (or refuse, checkpoint.on_data_change)."""
        if self.state.position == 0 or saved == self._fingerprint:
            return
        what = (f"the training set changed since the checkpoint ({saved.get('count')} -> "
                f"{self._fingerprint['count']} images, or other files)")
        if self.cfg.checkpoint.on_data_change == "error":
            raise CheckpointError(f"resume: {what}, so the rest of epoch {self.state.epoch} cannot be continued "
                                  f"by position; restore the data, or set checkpoint.on_data_change=restart_epoch",
                                  shared=True)
        log.warning("resume: %s; epoch %d restarts its order from the beginning (checkpoint.on_data_change="
                    "restart_epoch)", what, self.state.epoch)
        self.state.position, self.state.loss_sum, self.state.loss_count = 0, 0.0, 0.0

    def _rng_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _load_rng(self, states: list[dict[str, Any]]) -> None:
        if len(states) != self.dist.world_size:
            return  # another world size: build() reseeds instead
        mine = states[self.dist.rank]
        torch.set_rng_state(mine["torch"])
        if torch.cuda.is_available() and mine.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], self.device)

    # -- the loop ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the loader workers now (see :class:`LoaderOwner`); let go of held log records and of
        output_dir's lock (the process's end releases it too)."""
        self.loaders.close()
        if self._early_log is not None:
            self._early_log.detach()
            self._early_log = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _before_worker_fork(self) -> None:
        """Loader workers fork from this process: let an in-flight background save finish first, so no
        worker inherits a half-done state (a lock held by the writer thread)."""
        if self.checkpoints is not None:
            self.checkpoints.wait_local()

    def validate(self, model: nn.Module | None = None) -> EvalResult:
        """Exact validation of the model (or ``model``: the EMA)."""
        model = model if model is not None else unwrap(self.model)
        batches = self.loaders.iterate(self.val_loader)
        self.dist.broadcast_buffers(model)  # rank 0's BatchNorm statistics, as the checkpoint holds them
        return evaluate(model, batches, self.normalize, self.device, self.dist,
                        self.num_classes, len(self.val_set), self.cfg.train.precision)

    def _rank_best(self, value: float, epoch: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``checkpoint.keep_best`` > 1: keep the K best epochs' files as ``best_epoch_NNNN.pt``. Returns
        (names this epoch's file gets, names of files that left the K best)."""
        keep = self.cfg.checkpoint.keep_best
        if keep <= 1 or math.isnan(value):
            return (), ()
        kept = [list(e) for e in self.state.best_k]
        ranked = sorted(kept + [[value, epoch]], key=lambda e: e[0],
                        reverse=self.cfg.checkpoint.mode == "max")[:keep]  # stable: on a tie the older stays
        self.state.best_k = ranked
        if [value, epoch] not in ranked:
            return (), ()
        gone = tuple(f"best_epoch_{e:04d}.pt" for v, e in kept if [v, e] not in ranked)
        return (f"best_epoch_{epoch:04d}.pt",), gone

    def _is_better(self, value: float) -> bool:
        best = self.state.best
        if best is None or math.isnan(best):
            return True
        return value < best if self.cfg.checkpoint.mode == "min" else value > best

    def fit(self) -> FitResult:
        last_val = None
        epochs_run = 0
        self.stop.arm()
        if self.state.epoch < self.cfg.train.epochs and self._stop_agreed():
            # a warning signal (SIGUSR1) during start-up: stop together before the first step
            self._preempted("before the first step", saved=False)
        while self.state.epoch < self.cfg.train.epochs:
            figures = self._train_epoch(log_plan=epochs_run == 0)
            last_val = self._finish_epoch(figures)
            self.state.start_epoch(self.state.epoch + 1)
            epochs_run += 1
        self.checkpoints.finish()
        self.scalars.close()
        return FitResult(epochs_run, last_val, self.out)

    def _train_epoch(self, log_plan: bool = False) -> EpochFigures:
        """One pass over the rest of the epoch's plan: optimizer steps, progress, mid-epoch saves and
        stops. Returns the figures of the pass (the epoch's train_loss over every rank)."""
        cfg, dist, state = self.cfg, self.dist, self.state
        n = len(self.train_set)
        epoch = state.epoch
        plan = EpochPlan(n, world=dist.world_size, rank=dist.rank, batch_size=cfg.data.batch_size,
                         accum=cfg.train.grad_accum_steps, seed=cfg.seed, epoch=epoch, start=state.position,
                         drop_last=cfg.data.drop_last, max_steps=self.max_steps)
        if log_plan:
            self._log_plan(plan)
        self.batches.set_plan(plan)
        self.engine.running.reset()
        self.engine.data_wait_s = 0.0
        self._epoch_complete = False
        t0 = time.perf_counter()
        start_pos = state.position
        lr = self.schedule.lr(epoch + state.position / n)
        per_step = cfg.data.batch_size * dist.world_size * cfg.train.grad_accum_steps
        batches = self.loaders.iterate(self.train_loader)

        def lr_at(consumed: int) -> float:
            return self.schedule.lr(epoch + consumed / n, per_step / n)

        bar = Progress(self.show_bar, n, f"epoch {epoch}", initial=start_pos)
        try:
            for done in self.engine.train_steps(batches, plan, lr_at, first_step=state.step + 1):
                bar.update(done.consumed - state.position)
                state.step += 1
                if self.ema is not None:
                    self.ema.update(unwrap(self.model))
                if not dist.lowered:
                    dist.end_preparation()
                state.position = done.consumed
                lr = done.lr
                if state.step % cfg.train.log_every_steps == 0:
                    self._check_finite()
                    self._log_progress(epoch, n, t0, start_pos, bar)
                if state.step % cfg.preempt.check_every_steps == 0 and self._stop_agreed():
                    self._check_finite()
                    self.checkpoints.save(epoch=epoch, what=f"{state.position} samples in", wait=True)
                    self._preempted(f"epoch {epoch}, {state.position} of {n} samples")
                if self.checkpoints.should_save_step(state.step, state.position, n):
                    self._check_finite()
                    self.checkpoints.save(epoch=epoch, what=f"{state.position} samples in")
        finally:
            bar.close()
        del batches
        train_time = time.perf_counter() - t0
        loss_sum, loss_count = self._epoch_loss_sums()
        return EpochFigures(epoch, loss_sum / max(loss_count, 1.0), lr, state.position - start_pos, train_time,
                            self.engine.data_wait_s, t0)

    def _finish_epoch(self, fig: EpochFigures) -> EvalResult:
        """Validate, write the metrics row, and save (and stop) as the policy says."""
        cfg, dist = self.cfg, self.dist
        epoch = fig.epoch
        self._check_finite()
        val = self.validate()
        val_ema = self.validate(self.ema.module) if self.ema is not None else None
        epoch_time = time.perf_counter() - fig.started
        row = {"epoch": epoch, "train_loss": fig.train_loss, "val_loss": val.loss, "val_acc": val.acc,
               "val_acc5": val.acc5, "lr": fig.lr, "images_per_s": fig.images / max(fig.train_time_s, 1e-9),
               "epoch_time_s": epoch_time, "data_wait_frac": fig.data_wait_s / max(fig.train_time_s, 1e-9),
               "step": self.state.step, "val_count": val.count, "world_size": dist.world_size,
               "train_time_s": fig.train_time_s, "peak_rss_mb": dist.max_int(_peak_rss_mb())}
        if val_ema is not None:
            row.update(val_loss_ema=val_ema.loss, val_acc_ema=val_ema.acc)
        log.info("epoch %d: train_loss=%.4f val_loss=%.4f val_acc=%.4f%s lr=%.4g %.0f img/s (%.1fs)",
                 epoch, fig.train_loss, val.loss, val.acc,
                 (f" val_acc5={val.acc5:.4f}" if val.acc5 is not None else "")
                 + (f" val_loss_ema={val_ema.loss:.4f} val_acc_ema={val_ema.acc:.4f}" if val_ema is not None else ""),
                 fig.lr, row["images_per_s"], epoch_time)
        monitored = {"val_loss": val.loss, "val_acc": val.acc, "val_acc5": val.acc5 or 0.0,
                     "train_loss": fig.train_loss, **({"val_loss_ema": val_ema.loss, "val_acc_ema": val_ema.acc}
                                                      if val_ema is not None else {})}[cfg.checkpoint.monitor]
        is_best = self._is_better(monitored)
        if is_best:
            self.state.best = monitored
        also, remove = self._rank_best(monitored, epoch)
        if self.metrics is not None:
            self.metrics.append(row)
        self.scalars.add(row, self.state.step)
        final = epoch == cfg.train.epochs - 1
        stop_now = not final and self._stop_agreed()
        if self.checkpoints.should_save_epoch(epoch, is_best or bool(also), stop_now):
            self._epoch_complete = True
            self.checkpoints.save(epoch=epoch, what="complete", epoch_file=True, best=is_best, wait=stop_now,
                                  also=also, remove=remove)
        if stop_now:
            self._preempted(f"end of epoch {epoch}")
        return val

    def _log_plan(self, plan: EpochPlan) -> None:
        """Once per run: what the epoch plan does with the tail of the training set."""
        if plan.partial_only:
            log.info("data: the %d training images are fewer than one global batch; each epoch is one partial "
                     "optimizer step", plan.n)
        elif plan.dropped and self.cfg.data.drop_last:
            log.info("data.drop_last: the last %d sample(s) of each epoch's order are left out (a different "
                     "tail every epoch); data.drop_last=false trains them in the epoch's last step", plan.dropped)

    def _check_finite(self) -> None:
        """With train.stop_on_nonfinite, stop every rank (before anything is saved) once a training
        loss was nan/inf on any rank, naming the first such step. Called where the loop syncs anyway
        (log lines, saves, epoch end), so the check costs no extra device sync per step."""
        if not self.cfg.train.stop_on_nonfinite:
            return
        first = int(self.engine.nonfinite_step.item())
        earliest = self.dist.max_int(_NEVER - first if first >= 0 else 0)  # max of (NEVER - step): the earliest
        if not earliest:
            return
        step = _NEVER - earliest
        last = self.ckpt_dir / "last.pt"
        kept = (f"the last good checkpoint stays: '{last}' ({self.checkpoints.last_saved or 'from before this run'})"
                if last.exists() else "no checkpoint was written")
        raise NonFiniteLoss(f"the training loss became nan/inf at step {step} (epoch {self.state.epoch}); stopped "
                            f"without saving, {kept}. Lower optim.lr, set train.clip_grad_norm, or use "
                            f"train.precision=bf16 (train.stop_on_nonfinite=false trains on)", shared=True)

    def _stop_agreed(self) -> bool:
        """Every rank learns whether any rank received a stop signal (and which one)."""
        # rank 0's failed background write rides on the same all-reduce: every rank stops at the
        # next step with its message, not at the next save (an epoch later)
        failed = self.checkpoints is not None and self.checkpoints.failed_locally()
        code = self.dist.max_int(self.stop.signum | (_WRITE_FAILED if failed else 0))
        if code & _WRITE_FAILED:
            self.checkpoints.check()  # raises on every rank
        if code:
            self._stop_name = StopRequest.decode(code)
        return bool(code)

    def _preempted(self, where: str, saved: bool = True) -> None:
        name = self._stop_name
        if self.dist.env.is_local_main:
            write_marker(self.out if self.dist.is_main else None, name, self.state.epoch, self.state.step, saved)
        raise Preempted(name, where, saved)

    def _log_progress(self, epoch: int, n: int, t0: float, start_pos: int, bar: Progress) -> None:
        running = self.engine.running
        loss = (running.loss_sum / running.count.clamp(min=1)).item()  # a sync, but only every log interval
        elapsed = time.perf_counter() - t0
        position = self.state.position
        if bar.active:
            bar.update(0, loss=f"{loss:.4f}", img_s=f"{(position - start_pos) / max(elapsed, 1e-9):.0f}",
                       data_wait=f"{self.engine.data_wait_s / max(elapsed, 1e-9):.0%}")
            return
        log.info("epoch %d step %d: %d/%d samples, loss=%.4f (this rank), %.0f img/s, data wait %.0f%%",
                 epoch, self.state.step, position, n, loss, (position - start_pos) / max(elapsed, 1e-9),
                 100 * self.engine.data_wait_s / max(elapsed, 1e-9))
