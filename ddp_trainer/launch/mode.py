"""The execution-mode decision (pure) and wrapping/unwrapping of the model.

Modes: ``ddp`` (one process per device, launched by torchrun or srun), ``dp`` (DataParallel: one
process over all visible GPUs), ``single`` (one process, one device).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..compat import ddp_no_forward_buffer_sync, is_compiled_module
from ..errors import ConfigError
from .dist import GradientSyncWatch

Mode = Literal["ddp", "dp", "single"]


@dataclass(frozen=True)
class ModeDecision:
    mode: Mode
    backend: str | None  # process-group backend; None for dp/single
    use_cuda: bool
    gpus: int  # GPUs this process drives (dp: all visible)

    def describe(self) -> str:
        return {"ddp": "DDP", "dp": f"DataParallel over {self.gpus} GPUs", "single": "single device"}[self.mode]


def decide_mode(requested: str, backend: str, world_size: int, local_world_size: int,
                visible_gpus: int, launched: bool = False) -> ModeDecision:
    """Choose mode, backend and device use from the request and what the machine has.

    ``auto``: DDP when the launcher started several processes; DataParallel when one process sees
    several GPUs; a single device otherwise. Impossible requests raise ConfigError (never a hang).
    """
    if backend == "nccl" and visible_gpus == 0:
        raise ConfigError("dist.backend=nccl needs CUDA GPUs and none is visible; use dist.backend=gloo "
                          "(or auto) on CPU")
    if requested == "auto":
        requested = "ddp" if world_size > 1 else ("dp" if visible_gpus > 1 else "single")
    if requested == "ddp":
        if world_size < 2 and not launched:
            raise ConfigError("dist.mode=ddp needs several processes but this is one; start with "
                              "'torchrun --nproc_per_node=N launch.py' or use dist.mode=auto")
        use_cuda = visible_gpus > 0 and backend != "gloo"
        chosen = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        # whether two ranks would share a GPU is not a matter of counting the visible ones (srun's
        # --gpus-per-task shows each task one GPU of its own): launch.session compares the devices'
        # UUIDs across ranks once they have joined (shared_gpus)
        return ModeDecision("ddp", chosen, use_cuda, 1 if use_cuda else 0)
    if world_size > 1:
        raise ConfigError(f"dist.mode={requested} runs one process, but the launcher started {world_size}; "
                          f"use dist.mode=ddp (or auto), or start with 'python launch.py'")
    if requested == "dp":
        if visible_gpus == 0:
            raise ConfigError("dist.mode=dp (DataParallel) needs CUDA GPUs and none is visible; "
                              "use dist.mode=single or auto on CPU")
        return ModeDecision("dp", None, True, visible_gpus)
    return ModeDecision("single", None, visible_gpus > 0, 1 if visible_gpus > 0 else 0)


def prepare(model: nn.Module, decision: ModeDecision, *, sync_batchnorm: bool, channels_last: bool) -> nn.Module:
    """Model-level knobs applied before wrapping: channels_last weights, SyncBatchNorm for DDP on GPUs."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if sync_batchnorm and decision.mode == "ddp":
        if not decision.use_cuda:
            raise ConfigError("model.sync_batchnorm=true needs CUDA GPUs (SyncBatchNorm has no CPU kernel); "
                              "set model.sync_batchnorm=false on CPU", shared=True)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


class InputsOnReplicas(nn.Module):
    """DataParallel's module when each replica prepares its own chunk of the batch on its GPU
    (``prepare``: uint8 -> normalised float in the model's memory format): DataParallel then scatters
    uint8 straight from the host, a quarter of float32's bytes and no stop on cuda:0."""

    def __init__(self, model: nn.Module, prepare: nn.Module) -> None:
        super().__init__()
        self.model, self.prepare = model, prepare

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.prepare(x))


def wrap(model: nn.Module, decision: ModeDecision, device: torch.device,
         watch: GradientSyncWatch | None = None, prepare: nn.Module | None = None) -> nn.Module:
    """Wrap an (already placed) model for its mode. ``watch``: a GradientSyncWatch whose hook runs
    DDP's gradient all-reduce (so that a failed one is recognised as such). ``prepare``: with
    DataParallel, what each replica applies to its uint8 chunk (see :class:`InputsOnReplicas`)."""
    if decision.mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        # no broadcast of rank 0's buffers (BatchNorm statistics) at every forward: only rank 0's
        # ever count (validation and checkpoints take them, broadcast first: Trainer.validate), and
        # rank 0's evolve exactly as with the broadcast. One collective less per forward, and none
        # left inside forward() where a failure could not be told from the model's own errors
        ddp = DDP(model, device_ids=ids, **ddp_no_forward_buffer_sync())
        if watch is not None:
            watch.attach(ddp)
        return ddp
    if decision.mode == "dp":
        return nn.DataParallel(InputsOnReplicas(model, prepare.to(device)) if prepare is not None else model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(model, InputsOnReplicas):
            model = model.model
        elif is_compiled_module(model):  # by its class: a model's own child may be named _orig_mod
            model = model._orig_mod
        else:
            return model
