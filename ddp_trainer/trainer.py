"""The Trainer: builds everything from a config and a live :class:`Dist`, owns the loop state, and
runs epochs -> steps -> exact validation -> checkpoint -> metrics.

Rank-0 decisions are made when objects are built: only global rank 0 gets a checkpoint writer and a
metrics file (other ranks hold ``None`` and skip the write), every rank runs the same collectives.
"""
from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from . import config as config_mod
from .checkpoint import (FORMAT, FORMAT_VERSION, AsyncCheckpointWriter, CheckpointWriter, Loaded, canonical_state_dict,
                         has_checkpoints, load_weights, read_checkpoint, resume_candidates)
from .config import Config
from .data import (FolderDataset, build_splits, eval_transform, make_eval_loader, make_train_loader,
                   train_transform, with_decoded_cache)
from .distributed import Dist
from .engine import Engine, EvalResult, evaluate
from .errors import CheckpointError, ConfigError, DataError, UserError
from .models import build_model, classifier_head
from .optim import LRSchedule, build_optimizer
from .parallel import ModeDecision, prepare, unwrap, wrap
from .progress import Progress, Scalars, use_progress_bar
from .preempt import Preempted, StopRequest, clear_marker, worker_init_ignoring, write_marker
from .runlog import MetricsFile, add_file_log
from .samplers import EpochPlan
from .transforms import Normalize

log = logging.getLogger("ddp_trainer")


@dataclass
class FitResult:
    epochs_run: int
    last_val: EvalResult | None
    output_dir: Path


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


class Trainer:
    """Build with :meth:`build`, then call :meth:`fit`."""

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
        self.epoch = 0
        self.position = 0
        self.step = 0
        self.best: float | None = None
        self.stop = stop or StopRequest([])
        self._stop_name = ""  # the signal the ranks agreed on
        self._preparing = True  # collectives use dist.init_timeout_s until the first optimizer step

    # -- building ------------------------------------------------------------------------------

    def build(self) -> "Trainer":
        cfg, dist = self.cfg, self.dist
        with dist.waiting("rank 0 to prepare output_dir"):
            dist.main_then_broadcast(self._prepare_output_dir)
        self.splits = build_splits(cfg, dist)
        self.num_classes = len(self.splits.classes)
        log.info("data: %d train / %d val images, %d classes; val from %s", len(self.splits.train),
                 len(self.splits.val), self.num_classes, self.splits.source)
        with dist.waiting("rank 0 to read the checkpoint"):
            resume = dist.main_then_broadcast(self._find_resume)
            init = dist.main_then_broadcast(self._read_init_from) if cfg.model.init_from and resume is None else None

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
        if resume is not None:
            load_weights(model, resume.model, source=f"checkpoint '{resume.path}'")
        model = prepare(model.to(self.device), self.decision, sync_batchnorm=cfg.model.sync_batchnorm,
                        channels_last=cfg.train.channels_last)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        if resume is not None:
            self._restore_training_state(resume)
        model = wrap(model, self.decision, self.device)
        if cfg.train.compile:
            model = torch.compile(model)
        self.model = model
        self.normalize = Normalize(cfg.data.mean, cfg.data.std).to(self.device)
        self.schedule = LRSchedule(cfg.optim.lr, cfg.sched, cfg.train.epochs)

        seed = cfg.seed
        self.train_set = FolderDataset(self.splits.train, train_transform(cfg.data), seed,
                                       with_decoded_cache(self.splits.train, cfg.data, dist, cfg.data.train_cache_size))
        self.val_set = FolderDataset(self.splits.val, eval_transform(cfg.data), seed,
                                     with_decoded_cache(self.splits.val, cfg.data, dist, cfg.data.image_size))
        init = worker_init_ignoring(self.stop.signals)
        self.train_loader, self.batches = make_train_loader(self.train_set, cfg.data, self.device, worker_init_fn=init)
        self.val_loader = make_eval_loader(self.val_set, cfg.data, dist, self.device, worker_init_fn=init)
        self.engine = Engine(model, self.optimizer, self.normalize, self.device, cfg.train.precision,
                             cfg.train.clip_grad_norm, cfg.train.channels_last, self.scaler)
        writer_cls = AsyncCheckpointWriter if cfg.checkpoint.async_ else CheckpointWriter
        self.writer = writer_cls(self.ckpt_dir, cfg.checkpoint.keep_last) if dist.is_main else None
        self.metrics = MetricsFile(self.out / "metrics.jsonl") if dist.is_main else None
        show_bar = {"on": dist.is_main, "off": False}.get(cfg.log.progress, use_progress_bar(dist.is_main))
        self.show_bar = show_bar
        self.scalars = Scalars(cfg.log.tensorboard and dist.is_main, str(self.out / "tensorboard"))
        if self.metrics is not None:
            kept = self.metrics.cut_back(self.epoch)
            if resume is not None:
                log.info("metrics.jsonl: kept %d row(s) before epoch %d", kept, self.epoch)
        global_batch = cfg.data.batch_size * dist.world_size * cfg.train.grad_accum_steps
        log.info("model %s (%.2fM parameters); global batch %d = %d per process x %d process(es) x %d "
                 "accumulation step(s); optimizer %s lr=%g", cfg.model.name,
                 sum(p.numel() for p in model.parameters()) / 1e6, global_batch, cfg.data.batch_size,
                 dist.world_size, cfg.train.grad_accum_steps, cfg.optim.name, cfg.optim.lr)
        return self

    def _prepare_output_dir(self) -> None:
        """Rank 0: refuse to clobber a run, create the folder, save the resolved config, start train.log."""
        cfg = self.cfg
        if cfg.resume == "none" and has_checkpoints(self.ckpt_dir) and not cfg.overwrite:
            raise CheckpointError(
                f"output_dir '{self.out}' already holds checkpoints and resume=none would overwrite them; "
                f"use resume=auto to continue that run, another output_dir, or overwrite=true")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(config_mod.dump(cfg))
        except OSError as exc:
            raise UserError(f"output_dir '{self.out}' cannot be written ({exc.strerror}); choose a writable "
                            f"output_dir") from None
        add_file_log(self.out / "train.log", self.dist.rank)
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
            for path in resume_candidates(self.ckpt_dir):
                try:
                    loaded = read_checkpoint(path, self.trust)
                    break
                except CheckpointError as exc:
                    log.warning("resume: skipping %s: %s", path.name, exc.message)
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
        return read_checkpoint(self.cfg.model.init_from, self.trust)  # type: ignore[arg-type]

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

    def _restore_training_state(self, loaded: Loaded) -> None:
        self.epoch = loaded.start_epoch
        self.position = loaded.start_position
        self.step = loaded.step
        self.best = loaded.best
        if loaded.optimizer is not None:
            old_name = (loaded.config or {}).get("optim", {}).get("name", self.cfg.optim.name)
            try:
                if old_name != self.cfg.optim.name:
                    raise ValueError(f"checkpoint optimizer {old_name!r} != optim.name {self.cfg.optim.name!r}")
                self.optimizer.load_state_dict(loaded.optimizer)
            except (ValueError, KeyError, RuntimeError) as exc:
                log.warning("resume: optimizer state skipped, it does not fit the configured optimizer (%s)", exc)
        if loaded.scaler and self.scaler.is_enabled():
            self.scaler.load_state_dict(loaded.scaler)
        if loaded.rng is not None and len(loaded.rng) == self.dist.world_size:
            mine = loaded.rng[self.dist.rank]
            torch.set_rng_state(mine["torch"])
            if torch.cuda.is_available() and mine.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
        else:
            torch.manual_seed(self.cfg.seed + 1000 * self.dist.rank + self.step)

    # -- state -----------------------------------------------------------------------------------

    def _rng_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state_dict(self, epoch_complete: bool) -> dict[str, Any] | None:
        """The whole training state (rank 0 gets it; other ranks get None but must call too)."""
        rng = self.dist.all_gather_object(self._rng_state())
        if not self.dist.is_main:
            return None
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": canonical_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": self.epoch,
            "position": self.position,
            "epoch_complete": epoch_complete,
            "step": self.step,
            "best": self.best,
            "monitor": self.cfg.checkpoint.monitor,
            "class_to_idx": self.splits.class_to_idx,
            "model_name": self.cfg.model.name,
            "config": self.cfg.to_dict(),
            "world_size": self.dist.world_size,
            "torch_version": str(torch.__version__),
            "rng": rng,
        }

    def _save(self, *, epoch_complete: bool, epoch_file: bool = False, best: bool = False,
              wait: bool = False) -> None:
        """Save on rank 0 (every rank calls this at the same point). A failed earlier background
        write fails every rank here; ``wait`` blocks until this save is on disk."""
        self._check_writes()
        state = self.state_dict(epoch_complete)
        if self.writer is not None:
            path = self.writer.save(state, epoch_file=self.epoch if epoch_file else None, best=best)
            log.info("checkpoint: %s (epoch %d, %s)", path.name, self.epoch,
                     "complete" if epoch_complete else f"{self.position} samples in")
        if wait:
            self.finish_writes()

    def _check_writes(self) -> None:
        self.dist.main_then_broadcast(self.writer.check if self.writer is not None else lambda: None)

    def finish_writes(self) -> None:
        """Wait for the save in flight (rank 0) and fail every rank if it failed."""
        self.dist.main_then_broadcast(self.writer.close if self.writer is not None else lambda: None)

    # -- the loop ----------------------------------------------------------------------------------

    def _broadcast_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm statistics, so that validation matches the checkpoint."""
        if self.dist.active:
            for buf in unwrap(self.model).buffers():
                tdist.broadcast(buf, 0)

    def close(self) -> None:
        """Stop the loader workers now. After an exception its traceback keeps the loaders alive
        until interpreter exit, where multiprocessing would terminate and join workers that ignore
        SIGTERM (they must survive a cluster's signal): that join would never return."""
        for it in [getattr(self, "_current_batches", None)] + [
                getattr(getattr(self, name, None), "_iterator", None) for name in ("train_loader", "val_loader")]:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        for name in ("train_loader", "val_loader"):
            loader = getattr(self, name, None)
            if loader is not None:
                loader._iterator = None
        self._current_batches = None

    def _before_worker_fork(self, loader: Any) -> None:
        """Loader workers fork from this process: let an in-flight background save finish first, so no
        worker inherits a half-done state (a lock held by the writer thread). Persistent workers fork
        only once."""
        started = getattr(self, "_forked", set())
        self._forked = started
        if loader.num_workers == 0 or (loader.persistent_workers and id(loader) in started):
            return
        started.add(id(loader))
        if self.writer is not None:
            self.writer.wait()

    def validate(self) -> EvalResult:
        self._before_worker_fork(self.val_loader)
        self._broadcast_buffers()
        return evaluate(unwrap(self.model), self.val_loader, self.normalize, self.device, self.dist,
                        self.num_classes, len(self.val_set), self.cfg.train.precision)

    def _is_better(self, value: float) -> bool:
        if self.best is None or math.isnan(self.best):
            return True
        return value < self.best if self.cfg.checkpoint.mode == "min" else value > self.best

    def fit(self) -> FitResult:
        cfg, dist = self.cfg, self.dist
        n = len(self.train_set)
        last_val = None
        epochs_run = 0
        while self.epoch < cfg.train.epochs:
            epoch = self.epoch
            plan = EpochPlan(n, world=dist.world_size, rank=dist.rank, batch_size=cfg.data.batch_size,
                             accum=cfg.train.grad_accum_steps, seed=cfg.seed, epoch=epoch, start=self.position,
                             drop_last=cfg.data.drop_last, max_steps=self.max_steps)
            if epochs_run == 0:
                self._log_plan(plan)
            self.batches.set_plan(plan)
            self.engine.running.reset()
            self.engine.data_wait_s = 0.0
            t0 = time.perf_counter()
            start_pos = self.position
            lr = self.schedule.lr(epoch + self.position / n)
            per_step = cfg.data.batch_size * dist.world_size * cfg.train.grad_accum_steps
            self._before_worker_fork(self.train_loader)
            batches = iter(self.train_loader)
            self._current_batches = batches

            def lr_at(consumed: int) -> float:
                return self.schedule.lr(epoch + consumed / n, per_step / n)

            bar = Progress(self.show_bar, n, f"epoch {epoch}", initial=start_pos)
            try:
                for done in self.engine.train_steps(batches, plan, lr_at):
                    bar.update(done.consumed - self.position)
                    self.step += 1
                    if self._preparing:
                        dist.end_preparation()
                        self._preparing = False
                    self.position = done.consumed
                    lr = done.lr
                    if self.step % cfg.train.log_every_steps == 0:
                        self._log_progress(epoch, n, t0, start_pos, bar)
                    if self.step % cfg.preempt.check_every_steps == 0 and self._stop_agreed():
                        self._save(epoch_complete=False, wait=True)
                        self._preempted(f"epoch {epoch}, {self.position} of {n} samples")
                    if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0 and self.position < n:
                        self._save(epoch_complete=False)
            finally:
                bar.close()
            del batches
            train_time = time.perf_counter() - t0
            sums = torch.stack([self.engine.running.loss_sum, self.engine.running.count])
            dist.all_reduce_sum(sums)
            train_loss = (sums[0] / sums[1].clamp(min=1)).item()
            images = self.position - start_pos
            val = self.validate()
            last_val = val
            epoch_time = time.perf_counter() - t0
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val.loss, "val_acc": val.acc,
                   "val_acc5": val.acc5, "lr": lr, "images_per_s": images / max(train_time, 1e-9),
                   "epoch_time_s": epoch_time, "data_wait_frac": self.engine.data_wait_s / max(train_time, 1e-9),
                   "step": self.step, "val_count": val.count, "world_size": dist.world_size,
                   "train_time_s": train_time, "peak_rss_mb": dist.max_int(_peak_rss_mb())}
            log.info("epoch %d: train_loss=%.4f val_loss=%.4f val_acc=%.4f%s lr=%.4g %.0f img/s (%.1fs)",
                     epoch, train_loss, val.loss, val.acc,
                     f" val_acc5={val.acc5:.4f}" if val.acc5 is not None else "", lr,
                     row["images_per_s"], epoch_time)
            monitored = {"val_loss": val.loss, "val_acc": val.acc, "val_acc5": val.acc5 or 0.0,
                         "train_loss": train_loss}[cfg.checkpoint.monitor]
            is_best = self._is_better(monitored)
            if is_best:
                self.best = monitored
            if self.metrics is not None:
                self.metrics.append(row)
            self.scalars.add(row, self.step)
            final = epoch == cfg.train.epochs - 1
            saved = bool((cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0)
                         or final or is_best)
            stop_now = not final and self._stop_agreed()
            if saved or stop_now:
                self._save(epoch_complete=True, epoch_file=True, best=is_best, wait=stop_now)
            if stop_now:
                self._preempted(f"end of epoch {epoch}")
            self.epoch += 1
            self.position = 0
            epochs_run += 1
        self.finish_writes()
        self.scalars.close()
        return FitResult(epochs_run, last_val, self.out)

    def _log_plan(self, plan: EpochPlan) -> None:
        """Once per run: what the epoch plan does with the tail of the training set."""
        if plan.partial_only:
            log.info("data: the %d training images are fewer than one global batch; each epoch is one partial "
                     "optimizer step", plan.n)
        elif plan.dropped and self.cfg.data.drop_last:
            log.info("data.drop_last: the last %d sample(s) of each epoch's order are left out (a different "
                     "tail every epoch); data.drop_last=false trains them in the epoch's last step", plan.dropped)

    def _stop_agreed(self) -> bool:
        """Every rank learns whether any rank received a stop signal (and which one)."""
        signum = self.dist.max_int(self.stop.signum)
        if signum:
            self._stop_name = signal.Signals(signum).name
        return bool(signum)

    def _preempted(self, where: str) -> None:
        name = self._stop_name
        if self.dist.env.is_local_main:
            write_marker(self.out if self.dist.is_main else None, name, self.epoch, self.step)
        raise Preempted(name, where)

    def _log_progress(self, epoch: int, n: int, t0: float, start_pos: int, bar: Progress) -> None:
        running = self.engine.running
        loss = (running.loss_sum / running.count.clamp(min=1)).item()  # a sync, but only every log interval
        elapsed = time.perf_counter() - t0
        if bar.active:
            bar.update(0, loss=f"{loss:.4f}", img_s=f"{(self.position - start_pos) / max(elapsed, 1e-9):.0f}",
                       data_wait=f"{self.engine.data_wait_s / max(elapsed, 1e-9):.0%}")
            return
        log.info("epoch %d step %d: %d/%d samples, loss=%.4f (this rank), %.0f img/s, data wait %.0f%%",
                 epoch, self.step, self.position, n, loss, (self.position - start_pos) / max(elapsed, 1e-9),
                 100 * self.engine.data_wait_s / max(elapsed, 1e-9))
