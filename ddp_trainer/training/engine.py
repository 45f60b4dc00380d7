"""The training step loop and exact evaluation. No file I/O, no printing.

Per-step work is only what a hand-written loop does: metrics accumulate in device tensors and are
read at log intervals, never with a host-device sync per step.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import compat
from ..data.mixing import BatchMixer
from ..data.samplers import EpochPlan
from ..errors import CollectiveFailed, NonFiniteLoss
from ..launch.dist import Dist
from .losses import Loss, cross_entropy

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 images, labels, loss weights
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_NEVER = 1 << 62  # the non-finite agreement sends NEVER - step, so the max over ranks is the earliest step


@dataclass
class StepDone:
    """Yielded after each optimizer step."""

    index: int  # step index within this (possibly resumed) epoch
    consumed: int  # global samples of the epoch consumed after this step
    lr: float


@dataclass
class RunningLoss:
    """Device-side sums of training loss and counts; read only when asked."""

    device: torch.device
    loss_sum: torch.Tensor = field(init=False)
    count: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = torch.zeros((), dtype=torch.float64, device=self.device)


class Engine:
    """Runs optimizer steps for a wrapped model: autocast, accumulation, clipping, scaling."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, normalize: nn.Module,
                 device: torch.device, precision: str = "fp32", clip_grad_norm: float | None = None,
                 channels_last: bool = False, scaler: torch.amp.GradScaler | None = None,
                 label_smoothing: float = 0.0, mixer: BatchMixer | None = None, dist: Dist | None = None,
                 running: RunningLoss | None = None, replicas_prepare: bool = False,
                 loss: Loss | None = None) -> None:
        """``loss``: the training loss per sample (default: cross-entropy with ``label_smoothing``)."""
        self.model = model
        self.optimizer = optimizer
        self.normalize = normalize
        self.device = device
        self.clip = clip_grad_norm
        # the training loss only (evaluate() uses plain cross-entropy)
        self.loss = loss if loss is not None else cross_entropy(label_smoothing)
        self.mixer = mixer  # mixed images and soft targets (None: plain labels)
        self.dist = dist  # its gradient watch names a failed gradient all-reduce (None: no process group)
        # the model's DataParallel replicas normalise their own uint8 chunks (launch.mode.InputsOnReplicas)
        self.replicas_prepare = replicas_prepare
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        dtype = AUTOCAST_DTYPES.get(precision)
        self.autocast: Callable[[], Any] = (
            (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext)
        self.scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
        # gradient sync is skipped on accumulation micro-steps (DDP only has no_sync)
        self.no_sync: Callable[[], Any] = getattr(model, "no_sync", contextlib.nullcontext)
        # DDP's one-time bucket rebuild (a broadcast) is due at the first forward after the first
        # synced backward: run on its own there (see _rebuild_buckets), not inside the forward
        self._ddp = compat.ddp_inside(model) if dist is not None and dist.active else None
        self._synced_once = False
        self.running = running or RunningLoss(device)
        # the first optimizer step (global number) whose loss was nan/inf, -1 if none; on the device,
        # read only when asked (no sync per step)
        self.nonfinite_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.data_wait_s = 0.0
        self.non_blocking = device.type == "cuda"

    def start_pass(self) -> None:
        """A new pass over (the rest of) an epoch: its running loss and data wait start at zero."""
        self.running.reset()
        self.data_wait_s = 0.0

    def _to_device(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        images, labels, weights = batch
        if not self.replicas_prepare:  # (else DataParallel scatters the uint8 chunks to the replicas)
            images = images.to(self.device, non_blocking=self.non_blocking)
            images = self.normalize(images).contiguous(memory_format=self.memory_format)
        return (images, labels.to(self.device, non_blocking=self.non_blocking),
                weights.to(self.device, non_blocking=self.non_blocking))

    def train_steps(self, batches: Iterator[Any], plan: EpochPlan,
                    lr_at: Callable[[int], float], first_step: int = 1) -> Iterator[StepDone]:
        """Run the plan's optimizer steps, pulling micro-batches from ``batches``.

        ``lr_at(consumed_before_step)`` gives the learning rate of each step; ``first_step`` is the
        global number of the first one (recorded in ``nonfinite_step``).
        """
        self.model.train()
        consumed = plan.start
        for j in range(len(plan)):
            lr = lr_at(consumed)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            last = plan.micro_count(j) - 1
            finite = torch.ones((), dtype=torch.bool, device=self.device)
            for m in range(last + 1):
                t0 = time.perf_counter()
                batch = next(batches)
                self.data_wait_s += time.perf_counter() - t0
                started = time.monotonic()
                images, labels, weights = self._to_device(batch)
                targets = labels
                if self.mixer is not None:  # soft targets; the seed follows the step, so resume is exact
                    images, targets = self.mixer(images, labels, first_step + j, m)
                sync = contextlib.nullcontext() if m == last else self.no_sync()
                if self._ddp is not None and self._synced_once:
                    self._rebuild_buckets()
                try:
                    with sync:
                        with self.autocast():
                            logits = self.model(images)
                        losses = self.loss(logits.float(), targets)
                        self.scaler.scale((losses * weights).sum()).backward()
                except RuntimeError as exc:
                    self._collective_failure(exc, time.monotonic() - started)
                    raise
                self._synced_once |= m == last
                real = weights > 0
                finite &= torch.isfinite(losses.detach()).all()
                self.running.loss_sum += (losses.detach() * real).sum()
                self.running.count += real.sum()
            if self.clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_step = torch.where(finite | (self.nonfinite_step >= 0), self.nonfinite_step,
                                              first_step + j)
            consumed = plan.consumed_after(j)
            yield StepDone(j, consumed, lr)

    def _rebuild_buckets(self) -> None:
        """Run DDP's bucket rebuild as a collective of its own, once: a peer lost there raises
        CollectiveFailed (lost contact, or a timeout), not the broadcast's raw gloo/NCCL error that
        the forward would raise, indistinguishable there from the model's own errors."""
        ddp, self._ddp = self._ddp, None
        assert ddp is not None and self.dist is not None
        self.dist.watch("DDP's bucket rebuild (a broadcast from rank 0 at the first forward after the first "
                        "synced backward)", lambda: compat.rebuild_ddp_buckets(ddp))

    def _collective_failure(self, exc: RuntimeError, waited_s: float) -> None:
        """Raise CollectiveFailed from ``exc`` when the step's backward failed in DDP's gradient
        all-reduce (its watch saw it), or after waiting out the timeout in force (no computation of
        a step takes that long: a collective in it did)."""
        dist = self.dist
        if dist is None or not dist.active or isinstance(exc, torch.OutOfMemoryError):
            return
        dist.gradient_watch.check(exc, dist.timeout_now)
        if waited_s >= CollectiveFailed.TIMEOUT_FRACTION * dist.timeout_now:
            raise CollectiveFailed("a collective of the training step", waited_s, dist.timeout_now, exc) from exc

    def check_finite(self, dist: Dist, epoch: int, kept: Callable[[], str]) -> None:
        """Stop every rank (before anything is saved) once a training loss was nan/inf on any rank,
        naming the first such step; ``kept()`` says which checkpoint stays. Called where the loop
        syncs anyway (log lines, saves, epoch end), so the check costs no extra device sync per step."""
        first = int(self.nonfinite_step.item())
        earliest = dist.max_int(_NEVER - first if first >= 0 else 0)  # max of (NEVER - step): the earliest
        if not earliest:
            return
        raise NonFiniteLoss(f"the training loss became nan/inf at step {_NEVER - earliest} (epoch {epoch}); stopped "
                            f"without saving, {kept()}. Lower optim.lr, set train.clip_grad_norm, or use "
                            f"train.precision=bf16 (train.stop_on_nonfinite=false trains on)", shared=True)


@dataclass
class EvalResult:
    loss: float
    acc: float
    acc5: float | None
    count: int
    per_class_acc: list[float]


class CountMismatch(RuntimeError):
    """Evaluation saw a different number of images than the validation set holds."""


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Batch], normalize: nn.Module, device: torch.device, dist: Dist,
             num_classes: int, expected_count: int, precision: str = "fp32", channels_last: bool = False,
             tta: str = "none") -> EvalResult:
    """Exact validation: per-sample sums reduced across ranks, each image counted once. No host-device
    sync per batch: the sums stay on the device until the one all-reduce at the end. ``tta="flip"``:
    each image's logits are the mean of its own and its mirror image's (as FFCV's ImageNet example
    validates); the loss and accuracies are of those means.

    ``model`` should be the unwrapped module (no DDP hooks). Raises CountMismatch when the reduced
    count differs from ``expected_count`` (a padding or overlapping sampler).
    """
    was_training = model.training
    model.eval()
    dtype = AUTOCAST_DTYPES.get(precision)
    sums = torch.zeros(3 + 2 * num_classes, dtype=torch.float64, device=device)
    k5 = min(5, num_classes)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, labels, _ in loader:
        images = normalize(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            logits = model(images)
            mirrored = model(images.flip(-1)) if tta == "flip" else None
        logits = logits.float() if mirrored is None else (logits.float() + mirrored.float()) / 2
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        top = logits.topk(k5, dim=1).indices
        hit1 = top[:, 0] == labels
        sums[1] += hit1.sum()
        sums[2] += (top == labels[:, None]).any(dim=1).sum()
        # per-class hits and counts as sums of one-hot rows: no host sync (a boolean-mask index or
        # bincount waits for the device to learn the output size) and deterministic on GPU
        # (index_add_ / scatter_add_ use atomics: train.deterministic=true would refuse them)
        onehot = F.one_hot(labels, num_classes).to(sums.dtype)
        sums[3: 3 + num_classes] += (onehot * hit1[:, None]).sum(0)
        sums[3 + num_classes:] += onehot.sum(0)
    dist.all_reduce_sum(sums)
    model.train(was_training)
    values = sums.tolist()
    count = int(round(sum(values[3 + num_classes:])))
    if count != expected_count:
        raise CountMismatch(f"validation counted {count} images but the set holds {expected_count}: "
                            f"the eval sampler padded or dropped samples")
    per_class = [c / n if n else float("nan")
                 for c, n in zip(values[3: 3 + num_classes], values[3 + num_classes:])]
    return EvalResult(loss=values[0] / count, acc=values[1] / count,
                      acc5=values[2] / count if num_classes >= 5 else None, count=count,
                      per_class_acc=per_class)
