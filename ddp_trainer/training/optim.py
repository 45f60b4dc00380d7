"""Optimizers and the learning-rate schedule.

The schedule is a pure function of training progress measured in samples (epoch + fraction), not of
a step counter: it stays right when a run resumes with a different number of processes, where the
number of steps per epoch changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..checkpoint.registry import SaveContext
from ..config import OptimConfig, SchedConfig
from ..extras import optional

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm,
               nn.GroupNorm, nn.LocalResponseNorm)


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups, always in this order (resume and carried-over state rely on it).

    ``optim.norm_weight_decay`` null (default): [weights of rank >= 2: weight_decay, biases and norm
    weights: 0]. A number: [everything outside normalisation layers, biases included: weight_decay,
    normalisation layers' parameters: norm_weight_decay] (torchvision's ``--norm-weight-decay``)."""
    first, second = [], []
    if cfg.norm_weight_decay is None:
        for p in model.parameters():
            if p.requires_grad:
                (second if p.ndim <= 1 else first).append(p)
        return [{"params": first, "weight_decay": cfg.weight_decay}, {"params": second, "weight_decay": 0.0}]
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (second if isinstance(module, NORM_LAYERS) else first).append(p)
    return [{"params": first, "weight_decay": cfg.weight_decay},
            {"params": second, "weight_decay": cfg.norm_weight_decay}]


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The base learning rate the run uses: ``optim.lr``, or with ``optim.lr_scale=linear``
    ``optim.lr x global batch / 256``."""
    return cfg.lr * global_batch / 256 if cfg.lr_scale == "linear" else cfg.lr


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """SGD (with momentum, optionally Nesterov), AdamW, or timm's LAMB (its defaults: betas (0.9,
    0.999), eps 1e-6, the global gradient norm clipped at 1, as timm's ``--opt lamb`` builds it) over
    :func:`parameter_groups`, at ``lr`` (default ``optim.lr``)."""
    groups = parameter_groups(model, cfg)
    lr = cfg.lr if lr is None else lr
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "lamb":
        return optional("timm.optim", "optim.name=lamb", "timm").Lamb(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


@dataclass(frozen=True)
class LRSchedule:
    """``lr(progress)`` with ``progress`` in epochs (float): linear warmup from ``lr x
    warmup_start_factor`` to ``lr`` over ``warmup_epochs``, updated every step (at whole epochs the
    line is torch's ``LinearLR(start_factor, total_iters=warmup_epochs)`` stepped per epoch, as
    torchvision's recipe uses it), then cosine or step."""

    base_lr: float
    cfg: SchedConfig
    total_epochs: int

    def lr(self, progress: float, step_fraction: float = 0.0) -> float:
        """The lr of a step starting at ``progress`` epochs and covering ``step_fraction`` of an epoch."""
        warm = self.cfg.warmup_epochs
        factor = 1.0
        if warm > 0 and progress < warm:
            start = self.cfg.warmup_start_factor
            factor = start + (1.0 - start) * min(1.0, (progress + step_fraction) / warm)
        if self.cfg.name == "cosine":
            span = max(self.total_epochs - warm, 1e-9)
            t = min(max(progress - warm, 0.0) / span, 1.0)
            floor = self.cfg.min_lr
            return floor + (self.base_lr * factor - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.cfg.name == "step":
            return self.base_lr * factor * self.cfg.gamma ** int(progress // self.cfg.step_epochs)
        return self.base_lr * factor

    def save(self, ctx: SaveContext) -> dict[str, Any]:
        """What the schedule depends on (a component written, never restored: it has no hidden
        counters, and is a function of the config and the loop's progress)."""
        return {"name": self.cfg.name, "base_lr": self.base_lr, "warmup_epochs": self.cfg.warmup_epochs,
                "warmup_start_factor": self.cfg.warmup_start_factor, "total_epochs": self.total_epochs}


def optimizer_family(sd: Mapping[str, Any]) -> str | None:
    """``sgd``, ``adamw`` or ``lamb`` from an optimizer state dict's hyperparameters (Adam and AdamW
    keep the same per-parameter state; LAMB the same moments, told apart by its trust-ratio
    settings), or None when it is none of them."""
    groups = sd.get("param_groups") or []
    if not groups or not isinstance(groups[0], Mapping):
        return None
    if "trust_clip" in groups[0] and "betas" in groups[0]:
        return "lamb"
    if "betas" in groups[0]:
        return "adamw"
    if "momentum" in groups[0]:
        return "sgd"
    return None


def carry_over_state(foreign: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                     model_params: Sequence[torch.Tensor]) -> int | None:
    """Load another trainer's per-parameter optimizer state (momentum buffers, Adam moments, step)
    into ``optimizer``, whose groups are ours (hyperparameters stay those of the config).

    The foreign parameters are matched to the model's either group by group (a group of the same
    length and shapes, in any group order: timm's ``[no decay, decay]``), or all together in model
    order (one group over ``model.parameters()``: pytorch/examples, torchvision, Lightning). Returns
    the number of parameters whose state was carried, or None when nothing maps (shapes differ)."""
    try:
        fgroups = [list(g["params"]) for g in foreign["param_groups"]]
        fstate = foreign["state"]
    except (KeyError, TypeError):
        return None
    ours = optimizer.state_dict()
    our_groups = [list(g["params"]) for g in ours["param_groups"]]
    index_of = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    flat = [p for g in optimizer.param_groups for p in g["params"]]

    def shape(fidx: Any) -> tuple[int, ...] | None:
        st = fstate.get(fidx, fstate.get(str(fidx))) if isinstance(fstate, Mapping) else None
        for v in (st or {}).values():
            if isinstance(v, torch.Tensor) and v.ndim > 0:
                return tuple(v.shape)
        return None  # no state for it (never stepped): nothing to check or carry

    def fits(our_idx: list[int], f_idx: list[Any]) -> bool:
        return len(our_idx) == len(f_idx) and all(
            shape(f) in (None, tuple(flat[o].shape)) for o, f in zip(our_idx, f_idx))

    mapping: dict[int, Any] = {}
    free = list(range(len(fgroups)))
    for g in our_groups:
        match = next((k for k in free if fits(g, fgroups[k])), None)
        if match is None:
            mapping = {}
            break
        free.remove(match)
        mapping.update(zip(g, fgroups[match]))
    if not mapping:
        in_model_order = [index_of[id(p)] for p in model_params if id(p) in index_of]
        f_flat = [f for g in fgroups for f in g]
        if len(in_model_order) != len(flat) or not fits(in_model_order, f_flat):
            return None
        mapping = dict(zip(in_model_order, f_flat))
    state = {}
    for o, f in mapping.items():
        st = fstate.get(f, fstate.get(str(f)))
        if st:
            state[o] = st
    optimizer.load_state_dict({"state": state, "param_groups": ours["param_groups"]})
    return len(state)
