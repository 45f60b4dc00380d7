"""What the user sees of a run's epochs: the per-step progress (a bar on global rank 0 at a terminal,
else log lines), each epoch's line, its ``metrics.jsonl`` row (rank 0) and TensorBoard scalars."""
from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from typing import Any, Sequence

from ..config import Config
from ..launch.dist import Dist
from ..progress import Progress, Scalars, use_progress_bar
from ..trackers import EpochSink
from .engine import EvalResult, RunningLoss
from .run_folder import RunFolder

log = logging.getLogger("ddp_trainer")


@dataclass
class EpochFigures:
    """What one epoch's training pass measured."""

    epoch: int
    train_loss: float  # over every rank
    lr: float
    images: int  # samples trained in this process's pass over the epoch (all ranks)
    train_time_s: float
    data_wait_s: float
    started: float  # perf_counter at the start of the pass


def peak_rss_mb() -> int:
    """This process's peak resident memory in MiB (loader workers not included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


class EpochReport:
    """``sinks``: where each epoch's row also goes (trackers on rank 0, Ray's report on every rank)."""

    def __init__(self, cfg: Config, dist: Dist, folder: RunFolder, sinks: Sequence[EpochSink] = ()) -> None:
        self.dist = dist
        self.metrics = folder.metrics  # rank 0 only
        self.show_bar = {"on": dist.is_main, "off": False}.get(cfg.log.progress, use_progress_bar(dist.is_main))
        self.scalars = Scalars(cfg.log.tensorboard and dist.is_main, str(folder.path / "tensorboard"))
        self.sinks = list(sinks)
        self.last_row: dict[str, Any] | None = None

    def keep_rows_before(self, epoch: int, resumed: bool) -> None:
        """Drop the rows of epochs this run trains again (and a torn last line); the trackers get
        the kept rows their runs lack."""
        if self.metrics is not None:
            kept = self.metrics.cut_back(epoch)
            if resumed:
                log.info("metrics.jsonl: kept %d row(s) before epoch %d", kept, epoch)
                rows = self.metrics.rows()
                for sink in self.sinks:
                    sink.catch_up(rows)

    def bar(self, total: int, epoch: int, initial: int) -> Progress:
        return Progress(self.show_bar, total, f"epoch {epoch}", initial=initial)

    def progress(self, bar: Progress, running: RunningLoss, *, epoch: int, step: int, position: int, total: int,
                 start: int, t0: float, data_wait_s: float) -> None:
        """The progress of the pass so far (every ``train.log_every_steps``; reads the loss: a sync)."""
        loss = (running.loss_sum / running.count.clamp(min=1)).item()
        elapsed = max(time.perf_counter() - t0, 1e-9)
        if bar.active:
            bar.update(0, loss=f"{loss:.4f}", img_s=f"{(position - start) / elapsed:.0f}",
                       data_wait=f"{data_wait_s / elapsed:.0%}")
            return
        log.info("epoch %d step %d: %d/%d samples, loss=%.4f (this rank), %.0f img/s, data wait %.0f%%",
                 epoch, step, position, total, loss, (position - start) / elapsed, 100 * data_wait_s / elapsed)

    def epoch(self, fig: EpochFigures, val: EvalResult, val_ema: EvalResult | None, step: int) -> dict[str, Any]:
        """Log the epoch's line, write its row (rank 0) and scalars; return the row (every rank)."""
        epoch_time = time.perf_counter() - fig.started
        train_time = max(fig.train_time_s, 1e-9)
        row = {"epoch": fig.epoch, "train_loss": fig.train_loss, "val_loss": val.loss, "val_acc": val.acc,
               "val_acc5": val.acc5, "lr": fig.lr, "images_per_s": fig.images / train_time,
               "epoch_time_s": epoch_time, "data_wait_frac": fig.data_wait_s / train_time, "step": step,
               "val_count": val.count, "world_size": self.dist.world_size, "train_time_s": fig.train_time_s,
               "peak_rss_mb": self.dist.max_int(peak_rss_mb())}
        if val_ema is not None:
            row.update(val_loss_ema=val_ema.loss, val_acc_ema=val_ema.acc)
        log.info("epoch %d: train_loss=%.4f val_loss=%.4f val_acc=%.4f%s lr=%.4g %.0f img/s (%.1fs)",
                 fig.epoch, fig.train_loss, val.loss, val.acc,
                 (f" val_acc5={val.acc5:.4f}" if val.acc5 is not None else "")
                 + (f" val_loss_ema={val_ema.loss:.4f} val_acc_ema={val_ema.acc:.4f}" if val_ema is not None else ""),
                 fig.lr, row["images_per_s"], epoch_time)
        if self.metrics is not None:
            self.metrics.append(row)
        self.scalars.add(row, step)
        for sink in self.sinks:
            sink.epoch(row)
        self.last_row = row
        return row

    def close(self, finished: bool) -> None:
        """Close every sink (idempotent); ``finished``: the run completed (not stopped or failed)."""
        self.scalars.close()
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close(finished)
            except Exception as exc:  # noqa: BLE001 - closing a tracker never fails the run
                log.warning("closing %s failed (%s: %s)", type(sink).__name__, type(exc).__name__, exc)
