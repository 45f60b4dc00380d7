"""Process-group lifecycle and the few collectives the trainer needs.

:class:`Dist` is the one object the rest of the code asks about ranks. With one process its
collectives are no-ops, so the training loop never asks which mode it is in.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as tdist

from .env import LaunchEnv
from .errors import PeerTimeout, UserError
from .preempt import doing

log = logging.getLogger("ddp_trainer")
T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """The launch environment plus the live process group (when there is one)."""

    env: LaunchEnv
    backend: str | None  # None: no process group
    device: torch.device
    cpu_group: Any = None  # a gloo group for host-side flags (None: the default group is gloo already)
    timeout_s: float = 300.0  # the collectives' timeout once training runs (dist.timeout_s)
    init_timeout_s: float = 300.0  # the timeout until end_preparation() (dist.init_timeout_s)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size if self.backend else 1

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    # -- preparation: long waits, then the training timeout ------------------------------------

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Name the preparation step the collectives inside wait for: a rank whose wait runs past
        ``dist.init_timeout_s`` says what it waited for instead of printing gloo/nccl's text; a stop
        signal meanwhile ends the process at once, naming it too (see :mod:`preempt`)."""
        try:
            with doing(f"waiting for {what}"):
                yield
        except Exception as exc:  # noqa: BLE001 - only timeouts are translated, everything else re-raised
            if not (self.active and _is_timeout(exc)):
                raise
            raise PeerTimeout(f"gave up after waiting {self.init_timeout_s:g} s for {what} "
                              f"(dist.init_timeout_s={self.init_timeout_s:g}); if that step is just slow, raise "
                              f"dist.init_timeout_s, else look for the rank that stopped") from None

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Around the training loop: a collective that times out (a peer stalled, hung, was stopped,
        or its host became unreachable) reads as which rank did not answer within which setting,
        not as gloo/nccl's text."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - only timeouts are translated, everything else re-raised
            if not (self.active and _is_timeout(exc)):
                raise
            who = f"rank {1 - self.rank}" if self.world_size == 2 else "another rank"
            raise PeerTimeout(f"{who} did not answer within dist.timeout_s={self.timeout_s:g} s (it stalled, "
                              f"hangs, was stopped, or its host became unreachable); find what stopped it, or "
                              f"raise dist.timeout_s if a step can take that long") from None

    def end_preparation(self) -> None:
        """Lower the collectives' timeout from ``init_timeout_s`` to ``timeout_s`` (after the first
        optimizer step: from then on a long wait means a stalled or dead peer)."""
        if self.active and self.init_timeout_s != self.timeout_s:
            timeout = datetime.timedelta(seconds=self.timeout_s)
            tdist.set_timeout(timeout)
            if self.cpu_group is not None:
                tdist.set_timeout(timeout, self.cpu_group)
            log.info("dist: collective timeout lowered to dist.timeout_s=%g s after the first step", self.timeout_s)

    # -- collectives; no-ops without a process group ------------------------------------------

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (on its own device) and return it."""
        if self.active:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def max_int(self, value: int) -> int:
        """The largest ``value`` over ranks (a CPU all-reduce on the gloo group: no device sync)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self.cpu_group)
        return int(t.item())

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (pickled; tensors travel on the CPU)."""
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        tdist.broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def _object_device(self) -> torch.device | None:
        return self.device if self.backend == "nccl" else None

    def main_then_broadcast(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank.

        A :class:`UserError` raised by ``fn`` is broadcast too and re-raised on every rank (marked
        ``shared`` so that only rank 0 prints it): no rank waits for a result that never comes.
        """
        result: tuple[str, Any] | None = None
        if self.is_main:
            try:
                result = ("ok", fn())
            except UserError as exc:
                result = ("error", (type(exc), exc.message))
        if self.active:
            result = self.broadcast_object(result)
        assert result is not None
        status, value = result
        if status == "error":
            cls, message = value
            raise cls(message, shared=True)
        return value

    def all_ok(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if any rank raised a UserError, every rank raises one.

        The failing rank raises its own error (and prints it); the others raise a shared copy.
        """
        error: UserError | None = None
        value: Any = None
        try:
            value = fn()
        except UserError as exc:
            error = exc
        statuses = self.all_gather_object(None if error is None else (type(error), error.message))
        if error is not None:
            raise error
        for status in statuses:
            if status is not None:
                cls, message = status
                raise cls(message, shared=True)
        return value


def pick_device(env: LaunchEnv, use_cuda: bool) -> torch.device:
    """The device of this process: its local rank's GPU, or the CPU."""
    if use_cuda:
        return torch.device("cuda", env.local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text or type(exc).__name__ == "DistStoreError"


@contextlib.contextmanager
def process_group(env: LaunchEnv, backend: str | None, device: torch.device,
                  timeout_s: float, init_timeout_s: float | None = None) -> Iterator[Dist]:
    """Start the process group (when ``backend`` is given) and always destroy it on exit.

    Collectives time out after ``init_timeout_s`` until :meth:`Dist.end_preparation`, then after
    ``timeout_s``."""
    init_timeout_s = timeout_s if init_timeout_s is None else init_timeout_s
    if backend is None:
        yield Dist(env=env, backend=None, device=device, timeout_s=timeout_s, init_timeout_s=init_timeout_s)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = device
    with doing(f"waiting for the other ranks to join the process group (world size {env.world_size}, "
               f"{env.master_addr}:{env.master_port})"):
        tdist.init_process_group(
            backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size,
            timeout=datetime.timedelta(seconds=init_timeout_s), **kwargs)
    try:
        cpu_group = (tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=init_timeout_s))
                     if backend != "gloo" else None)
        yield Dist(env=env, backend=backend, device=device, cpu_group=cpu_group, timeout_s=timeout_s,
                   init_timeout_s=init_timeout_s)
    finally:
        with contextlib.suppress(Exception):
            tdist.destroy_process_group()
