"""Process-group lifecycle and the few collectives the trainer needs.

:class:`Dist` is the one object the rest of the code asks about ranks. With one process its
collectives are no-ops, so the training loop never asks which mode it is in.

Every collective goes through :meth:`Dist._run`, which turns a failure into
:class:`~ddp_trainer.errors.CollectiveFailed` naming the operation and how long it waited; the
gradient all-reduce inside DDP's backward reports through :class:`GradientSyncWatch`. Errors are
classified by those types, never by the text torch put in them.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as tdist
from torch import nn

from .. import compat
from ..errors import CollectiveFailed, ConfigError, PeerLost, PeerTimeout, UserError
from .environment import LaunchEnv
from .signals import doing

log = logging.getLogger("ddp_trainer")
T = TypeVar("T")


@dataclass
class Dist:
    """The launch environment plus the live process group (when there is one)."""

    env: LaunchEnv
    backend: str | None  # None: no process group
    device: torch.device
    cpu_group: tdist.ProcessGroup | None = None  # a gloo group for host-side flags (None: the default group is gloo already)
    timeout_s: float = 300.0  # the collectives' timeout once training runs (dist.timeout_s)
    init_timeout_s: float = 300.0  # the timeout until end_preparation() (dist.init_timeout_s)
    lowered: bool = False  # end_preparation() has lowered the timeout to timeout_s
    gradient_watch: "GradientSyncWatch" = field(default_factory=lambda: GradientSyncWatch())

    @classmethod
    def single(cls, device: torch.device | None = None) -> "Dist":
        """One process, no process group (tools and commands that run outside a launch)."""
        return cls(env=LaunchEnv(), backend=None, device=device or torch.device("cpu"))

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

    @property
    def timeout_now(self) -> float:
        """The timeout the collectives run under at this moment."""
        return self.timeout_s if self.lowered else self.init_timeout_s

    # -- preparation: long waits, then the training timeout ------------------------------------

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Name the preparation step the collectives inside wait for: a rank whose wait runs past
        ``dist.init_timeout_s`` says what it waited for instead of printing gloo/nccl's text; a stop
        signal meanwhile ends the process at once, naming it too (see :mod:`preempt`)."""
        try:
            with doing(f"waiting for {what}"):
                yield
        except CollectiveFailed as exc:
            if not exc.timed_out:
                raise _lost(exc, f"while waiting for {what}") from None
            raise PeerTimeout(f"gave up after waiting {self.init_timeout_s:g} s for {what} "
                              f"(dist.init_timeout_s={self.init_timeout_s:g}); if that step is just slow, raise "
                              f"dist.init_timeout_s, else look for the rank that stopped") from None

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Around the training loop: a collective that times out (a peer stalled, hung, was stopped,
        or its host became unreachable) reads as which rank did not answer within which setting,
        not as gloo/nccl's text; one that failed sooner reads as lost contact."""
        try:
            yield
        except CollectiveFailed as exc:
            if not exc.timed_out:
                raise _lost(exc, "during training") from None
            who = f"rank {1 - self.rank}" if self.world_size == 2 else "another rank"
            setting = "dist.timeout_s" if self.lowered else "dist.init_timeout_s"
            raise PeerTimeout(f"{who} did not answer within {setting}={exc.timeout_s:g} s (it stalled, "
                              f"hangs, was stopped, or its host became unreachable); find what stopped it, or "
                              f"raise {setting} if a step can take that long") from None

    def end_preparation(self) -> None:
        """Lower the collectives' timeout from ``init_timeout_s`` to ``timeout_s``, on every rank
        together (after the first optimizer step: from then on a long wait means a stalled or dead
        peer). The ranks first meet under the long timeout, so a rank still compiling or warming up
        is not held to the short one by a faster rank."""
        if self.lowered:
            return
        if self.active and self.init_timeout_s != self.timeout_s:
            self.barrier()
            timeout = datetime.timedelta(seconds=self.timeout_s)
            compat.set_group_timeout(timeout)
            if self.cpu_group is not None:
                compat.set_group_timeout(timeout, self.cpu_group)
            log.info("dist: collective timeout lowered to dist.timeout_s=%g s after the first step", self.timeout_s)
        self.lowered = True

    # -- collectives; no-ops without a process group ------------------------------------------

    def watch(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, a collective torch runs by itself (named ``what``), as one of ours: a failure
        raises :class:`CollectiveFailed`, read by :meth:`training` / :meth:`waiting`."""
        return self._run(what, fn)

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        """Run one collective; a failure becomes :class:`CollectiveFailed` (what, how long it waited)."""
        t0 = time.monotonic()
        try:
            return fn()
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # torch's DistError family included
            raise CollectiveFailed(what, time.monotonic() - t0, self.timeout_now, exc) from exc

    def barrier(self) -> None:
        """Every rank reaches this point (on the CPU group: no device work)."""
        if self.active:
            self._run("a barrier", lambda: tdist.barrier(group=self.cpu_group))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (on its own device) and return it."""
        if self.active:
            self._run("an all-reduce", lambda: tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM))
        return tensor

    def max_int(self, value: int) -> int:
        """The largest ``value`` over ranks (a CPU all-reduce on the gloo group: no device sync)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        self._run("an all-reduce", lambda: tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self.cpu_group))
        return int(t.item())

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Give every rank rank 0's buffers of ``module`` (BatchNorm statistics)."""
        if self.active:
            for buf in module.buffers():
                self._run("a broadcast", lambda: tdist.broadcast(buf, 0))

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (pickled, on the CPU group: a checkpoint broadcast this
        way never takes GPU memory, and a peer that never answers cannot trip NCCL's watchdog, which
        would kill the process before the wait is named and the run folder let go)."""
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        self._run("a broadcast", lambda: tdist.broadcast_object_list(box, src=src, group=self.cpu_group))
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (pickled, on the CPU group)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._run("an all-gather", lambda: tdist.all_gather_object(out, obj, group=self.cpu_group))
        return out

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


def _lost(exc: CollectiveFailed, when: str) -> PeerLost:
    return PeerLost(f"lost contact with another rank {when} (its process or host died, or the network "
                    f"failed): {exc.what} failed after {exc.waited_s:.1f} s ({exc.detail})")


class GradientSyncWatch:
    """DDP's gradient all-reduce, run by a communication hook that records a failure.

    The all-reduce runs inside ``backward()``, where a failed one surfaces as a plain RuntimeError
    indistinguishable from any other error of the backward pass; the hook (the same arithmetic as
    torch's default ``allreduce_hook``, which DDP documents as equal to no hook) notes that the
    all-reduce itself failed and how long it waited, so the caller can raise
    :class:`CollectiveFailed` (:meth:`check`)."""

    def __init__(self) -> None:
        self.waited_s: float | None = None

    # no annotations: DDP compares the hook's annotations with torch's classes, and this module's
    # annotations are strings (from __future__ import annotations)
    def hook(self, group, bucket):  # type: ignore[no-untyped-def]
        """(process group or None, GradBucket) -> Future of the averaged bucket."""
        group = group if group is not None else tdist.group.WORLD
        tensor = bucket.buffer()
        tensor.div_(group.size())
        t0 = time.monotonic()

        def done(fut: torch.futures.Future) -> torch.Tensor:
            try:
                return fut.value()[0]
            except Exception:
                self.waited_s = time.monotonic() - t0
                raise

        return tdist.all_reduce(tensor, group=group, async_op=True).get_future().then(done)

    def attach(self, ddp_model: nn.Module) -> None:
        ddp_model.register_comm_hook(None, self.hook)

    def check(self, exc: BaseException, timeout_s: float) -> None:
        """Raise :class:`CollectiveFailed` from ``exc`` when the gradient all-reduce failed."""
        if self.waited_s is not None:
            raise CollectiveFailed("the gradient all-reduce", self.waited_s, timeout_s, exc) from exc


def device_index(local_rank: int, visible_gpus: int) -> int:
    """The GPU (among those this process sees) that local rank ``local_rank`` drives: its own when
    every task sees all of the node's GPUs, the only one when srun binds one GPU per task."""
    return local_rank % max(visible_gpus, 1)


def pick_device(env: LaunchEnv, use_cuda: bool) -> torch.device:
    """The device of this process: its local rank's GPU, or the CPU."""
    if use_cuda:
        return torch.device("cuda", device_index(env.local_rank, torch.cuda.device_count()))
    return torch.device("cpu")


def device_uuid(device: torch.device) -> str | None:
    """The GPU's UUID (the same whatever CUDA_VISIBLE_DEVICES calls it), None for the CPU."""
    return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None


@dataclass(frozen=True)
class Placement:
    """Where a rank runs: its host and its GPU's UUID (None on the CPU)."""

    rank: int
    host: str
    gpu: str | None


def shared_gpus(placements: list[Placement]) -> str | None:
    """The fix to state when two ranks drive the same GPU (nccl refuses it, and the two would share
    its memory), else None."""
    seen: dict[tuple[str, str], int] = {}
    for p in placements:
        if p.gpu is None:
            continue
        other = seen.setdefault((p.host, p.gpu), p.rank)
        if other != p.rank:
            return (f"ranks {other} and {p.rank} on {p.host} both drive GPU {p.gpu}: each rank needs a GPU of its "
                    f"own; start one process per GPU (torchrun --nproc_per_node=<GPUs of the node>; srun "
                    f"--gpus-per-task=1 or --ntasks-per-node=<GPUs of the node>), or use dist.backend=gloo")
    return None


@contextlib.contextmanager
def _existing_group(env: LaunchEnv, device: torch.device, timeout_s: float,
                    init_timeout_s: float) -> Iterator[Dist]:
    """The default process group another engine started, checked against the launch environment;
    never destroyed here (the engine does that). Its timeout is the run's from now on."""
    backend = tdist.get_backend()
    if (tdist.get_rank(), tdist.get_world_size()) != (env.rank, env.world_size):
        raise ConfigError(f"the process group already started is rank {tdist.get_rank()} of "
                          f"{tdist.get_world_size()}, but RANK / WORLD_SIZE say {env.rank} of {env.world_size}")
    compat.set_group_timeout(datetime.timedelta(seconds=init_timeout_s))
    cpu_group = tdist.new_group(backend="gloo") if backend != "gloo" else None
    log.info("dist: using the %s process group the launching engine started (it is not started again)", backend)
    try:
        yield Dist(env=env, backend=backend, device=device, cpu_group=cpu_group, timeout_s=timeout_s,
                   init_timeout_s=init_timeout_s)
    finally:
        if cpu_group is not None:
            with contextlib.suppress(Exception):
                tdist.destroy_process_group(cpu_group)


def _store(env: LaunchEnv, timeout: datetime.timedelta) -> tdist.Store:
    """The env:// store (torch's own choice of who hosts it), its keys under a prefix per torchrun
    restart round. torchrun's agent keeps one store across the rounds of ``--max-restarts`` and
    hands every round's workers the same address (unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): a
    restarted rank could read the previous round's keys, the addresses of dead peers, and gloo's
    mesh would fail to connect ("Connection refused")."""
    store, _, _ = next(tdist.rendezvous("env://", rank=env.rank, world_size=env.world_size, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return tdist.PrefixStore(f"ddp_trainer/attempt_{attempt}", store) if attempt is not None else store


@contextlib.contextmanager
def process_group(env: LaunchEnv, backend: str | None, device: torch.device, timeout_s: float,
                  init_timeout_s: float | None = None, trace_dir: Path | None = None) -> Iterator[Dist]:
    """Start the process group (when ``backend`` is given) and always destroy it on exit.

    Collectives time out after ``init_timeout_s`` until :meth:`Dist.end_preparation`, then after
    ``timeout_s``. With nccl, NCCL's flight recorder keeps the last collectives of each rank and
    dumps them into ``trace_dir`` (``rank_<N>``, the folder made by the caller) when its watchdog sees
    a timeout (as torchtitan does; variables already set are left alone)."""
    init_timeout_s = timeout_s if init_timeout_s is None else init_timeout_s
    if backend is None:
        yield Dist(env=env, backend=None, device=device, timeout_s=timeout_s, init_timeout_s=init_timeout_s)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if tdist.is_initialized():  # an engine started it (Ray Train): used as it is, and left to the engine
        with _existing_group(env, device, timeout_s, init_timeout_s) as dist:
            yield dist
        return
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    if backend == "nccl" and trace_dir is not None:
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
        os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(trace_dir / "rank_"))  # the folder: RunFolder
    # no device_id for nccl: its communicators start at the first NCCL collective (DDP's weight
    # broadcast), after launch.session has checked over gloo that no two ranks share a GPU
    joining = (f"the other ranks to join the process group (world size {env.world_size}, "
               f"{env.master_addr}:{env.master_port})")
    t0 = time.monotonic()
    timeout = datetime.timedelta(seconds=init_timeout_s)
    with doing(f"waiting for {joining}"):
        try:
            tdist.init_process_group(backend=backend, store=_store(env, timeout), rank=env.rank,
                                     world_size=env.world_size, timeout=timeout)
        except RuntimeError:  # torch's DistError family: classified by the wait, as collectives are
            if time.monotonic() - t0 < CollectiveFailed.TIMEOUT_FRACTION * init_timeout_s:
                raise
            raise PeerTimeout(f"gave up after waiting {init_timeout_s:g} s for {joining} (dist.init_timeout_s="
                              f"{init_timeout_s:g}); start every rank with the same MASTER_ADDR, MASTER_PORT and "
                              f"WORLD_SIZE, or raise dist.init_timeout_s if some start late") from None
    try:
        cpu_group = (tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=init_timeout_s))
                     if backend != "gloo" else None)
        yield Dist(env=env, backend=backend, device=device, cpu_group=cpu_group, timeout_s=timeout_s,
                   init_timeout_s=init_timeout_s)
    finally:
        with contextlib.suppress(Exception):
            tdist.destroy_process_group()
