"""The training loop: epochs -> steps -> exact validation -> checkpoint -> metrics.

A :class:`Trainer` holds the components :func:`~.build.build_trainer` assembled and runs them; every
rank runs the same collectives, and rank-0 decisions were made when the components were built (only
rank 0 has a checkpoint writer and a metrics file).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.policy import CheckpointManager
from ..config import Config
from ..data.loaders import RunData
from ..data.samplers import EpochPlan
from ..launch.dist import Dist
from ..launch.mode import unwrap
from ..launch.signals import Agreement, Preempted, StopRequest, write_marker
from .components import LoopState
from .ema import WeightEMA
from .engine import Engine, EvalResult, evaluate
from .optim import LRSchedule
from .report import EpochFigures, EpochReport
from .run_folder import RunFolder

log = logging.getLogger("ddp_trainer")


@dataclass
class FitResult:
    epochs_run: int
    last_val: EvalResult | None
    output_dir: Path
    last_row: dict | None = None  # the last epoch's metrics row (None: nothing left to train)


class Trainer:
    """Call :meth:`fit`, and :meth:`close` on every exit path."""

    def __init__(self, cfg: Config, dist: Dist, *, folder: RunFolder, loop: LoopState, model: nn.Module,
                 ema: WeightEMA | None, schedule: LRSchedule, engine: Engine, data: RunData,
                 checkpoints: CheckpointManager, report: EpochReport, stop: StopRequest,
                 max_steps_per_epoch: int | None = None) -> None:
        self.cfg, self.dist, self.folder, self.loop, self.model, self.ema = cfg, dist, folder, loop, model, ema
        self.schedule, self.engine, self.data = schedule, engine, data
        self.checkpoints, self.report = checkpoints, report
        self.stop, self.max_steps = stop, max_steps_per_epoch
        self.state = loop.state
        self._stopping: str | None = None  # the signal the ranks agreed to stop on

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
        self.report.close(finished=True)
        return FitResult(epochs_run, last_val, self.folder.path, self.report.last_row)

    def close(self) -> None:
        """Stop the loader workers now; wait for the checkpoint write in flight (its thread never
        outlives the run: after a KeyboardInterrupt, train() returns only once it has ended); close
        what the report writes to (a tracker of a run that did not finish is marked so); let go of
        output_dir (held log records, the lock)."""
        self.data.close()
        self.checkpoints.wait_local()  # no collective: every path out of the run, a failed one included
        self.report.close(finished=False)
        self.folder.close()

    def validate(self, model: nn.Module | None = None) -> EvalResult:
        """Exact validation of the model (or ``model``: the EMA), with rank 0's BatchNorm
        statistics on every rank (as the checkpoint holds them)."""
        model = model if model is not None else unwrap(self.model)
        batches = self.data.val_batches()
        self.dist.broadcast_buffers(model)
        return evaluate(model, batches, self.engine.normalize, self.dist.device, self.dist,
                        len(self.data.splits.classes), len(self.data.val_set), self.cfg.train.precision,
                        self.cfg.train.channels_last, tta=self.cfg.train.val_tta)

    def _train_epoch(self, log_plan: bool = False) -> EpochFigures:
        """One pass over the rest of the epoch's plan: optimizer steps, progress, mid-epoch saves and
        stops. Returns the figures of the pass (the epoch's train_loss over every rank)."""
        cfg, dist, state = self.cfg, self.dist, self.state
        epoch, start = state.epoch, state.position
        plan = EpochPlan(len(self.data.train_set), world=dist.world_size, rank=dist.rank,
                         batch_size=cfg.data.batch_size, accum=cfg.train.grad_accum_steps, seed=cfg.seed, epoch=epoch,
                         start=start, drop_last=cfg.data.drop_last, max_steps=self.max_steps,
                         sampler=self.data.sampler)
        n = plan.size  # draws in the epoch: the training set's size, or distributed's padded length
        if log_plan:
            _log_plan(plan, cfg.data.drop_last)
        batches = self.data.train_batches(plan)
        self.engine.start_pass()
        t0 = time.perf_counter()
        lr = self.schedule.lr(epoch + start / n)
        per_step = cfg.data.batch_size * dist.world_size * cfg.train.grad_accum_steps

        def lr_at(consumed: int) -> float:
            return self.schedule.lr(epoch + consumed / n, per_step / n)

        bar = self.report.bar(n, epoch, start)
        try:
            for done in self.engine.train_steps(batches, plan, lr_at, first_step=state.step + 1):
                bar.update(done.consumed - state.position)
                state.step += 1
                if self.ema is not None:
                    self.ema.after_step(unwrap(self.model), state.step, epoch)
                if not dist.lowered:
                    dist.end_preparation()
                state.position, lr = done.consumed, done.lr
                if state.step % cfg.train.log_every_steps == 0:
                    self._check_finite()
                    self.report.progress(bar, self.engine.running, epoch=epoch, step=state.step,
                                         position=state.position, total=n, start=start, t0=t0,
                                         data_wait_s=self.engine.data_wait_s)
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
        loss_sum, loss_count = self.loop.epoch_sums()
        return EpochFigures(epoch, loss_sum / max(loss_count, 1.0), lr, state.position - start, train_time,
                            self.engine.data_wait_s, t0)

    def _finish_epoch(self, fig: EpochFigures) -> EvalResult:
        """Validate, write the metrics row, and save (and stop) as the policy says."""
        epoch = fig.epoch
        self._check_finite()
        val = self.validate()
        val_ema = self.validate(self.ema.module) if self.ema is not None else None
        row = self.report.epoch(fig, val, val_ema, self.state.step)
        monitored = row[self.cfg.checkpoint.monitor]
        judgement = self.checkpoints.ranking.judge(monitored if monitored is not None else 0.0, epoch)
        stop_now = epoch != self.cfg.train.epochs - 1 and self._stop_agreed()
        if self.checkpoints.should_save_epoch(epoch, judgement.is_best or bool(judgement.also), stop_now):
            self.checkpoints.save(epoch=epoch, what="complete", end_of_epoch=True, judgement=judgement,
                                  wait=stop_now)
        if stop_now:
            self._preempted(f"end of epoch {epoch}")
        return val

    def _check_finite(self) -> None:
        """With train.stop_on_nonfinite: every rank stops once a training loss was nan/inf on any rank."""
        if self.cfg.train.stop_on_nonfinite:
            self.engine.check_finite(self.dist, self.state.epoch, self._kept)

    def _kept(self) -> str:
        last = self.folder.checkpoints / "last.pt"
        return (f"the last good checkpoint stays: '{last}' ({self.checkpoints.last_saved or 'from before this run'})"
                if last.exists() else "no checkpoint was written")

    def _stop_agreed(self) -> bool:
        """Every rank learns whether any rank received a stop signal (and which one), and whether rank
        0's last background write failed (then every rank raises its error here)."""
        code = self.dist.max_int(self.stop.agreement_code(self.checkpoints.failed_locally()))
        agreed = Agreement.decode(code)
        if agreed.write_failed:
            self.checkpoints.check()  # raises on every rank
        self._stopping = agreed.signal
        return agreed.signal is not None

    def _preempted(self, where: str, saved: bool = True) -> None:
        name = self._stopping or "a signal"
        if self.dist.env.is_local_main:
            write_marker(self.folder.path if self.dist.is_main else None, name, self.state.epoch,
                         self.state.step, saved)
        raise Preempted(name, where, saved)


def _log_plan(plan: EpochPlan, drop_last: bool) -> None:
    """Once per run: which sampler draws the epochs, and what the plan does with their tail."""
    spec = plan.sampler
    if spec.kind == "distributed":
        log.info("data.sampler=distributed: torch's DistributedSampler over %d images; %d padding sample(s) "
                 "repeat the first ones so that each of %d rank(s) gets %d", plan.n, plan.padded, plan.world,
                 plan.size // plan.world)
    elif spec.kind == "repeated_augment":
        distinct = math.ceil(plan.n / spec.repeats)
        last = plan.n - (distinct - 1) * spec.repeats  # the order is cut at n draws: the last image's copies
        log.info("data.sampler=repeated_augment: each epoch draws %d images, %d distinct ones %d time(s) each%s "
                 "(data.ra_repeats), the copies on different ranks with their own augmentation", plan.n,
                 distinct, spec.repeats, f" (the last one {last} time(s))" if last != spec.repeats else "")
    elif spec.kind == "class_balanced":
        log.info("data.sampler=class_balanced: each epoch draws %d images with replacement, classes weighted "
                 "(data.class_weights, else evenly)", plan.n)
    elif spec.kind == "shard_window":
        assert spec.shards is not None
        count = int(torch.unique(spec.shards).numel())
        log.info("data.sampler=shard_window: each epoch reads the %d shards in a shuffled order, each of %d rank(s) "
                 "its own run of about %d, samples shuffled within windows of %d shard(s) (data.shard_window)",
                 count, plan.world, -(-count // plan.world), spec.window)
    if plan.partial_only:
        log.info("data: the %d training images are fewer than one global batch; each epoch is one partial "
                 "optimizer step", plan.n)
    elif plan.dropped and drop_last:
        log.info("data.drop_last: the last %d sample(s) of each epoch's order are left out (a different "
                 "tail every epoch); data.drop_last=false trains them in the epoch's last step", plan.dropped)
