"""The optimizer's state by parameter name: the form a checkpoint keeps it in, and how it is put back.

A parameter's state (momentum buffer, Adam moments, step count) belongs to that parameter, wherever
its group or its position is. Saved: torch's ``Optimizer.state_dict()`` with each group's
``param_names`` (see :func:`~ddp_trainer.checkpoint.format.optimizer_param_names`). Restored by
name into the optimizer as the config builds it now: another grouping (``optim.norm_weight_decay``
switched) or another registration order of the model's parameters gets each parameter its own
state, and the hyperparameters (momentum, Nesterov, weight decay, betas) are always the config's.

This project's earlier files hold no names: their slots are named through the grouping their own
config made (:func:`positional_names`), with counts and shapes checked. That cannot tell two
equal-shaped parameters apart whose registration order changed since; only names can.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import nn

from ..config import OptimConfig
from ..errors import ConfigError
from .optim import parameter_groups

# group entries that are no setting of the config: the slots, and the lr the schedule sets each step
NOT_SETTINGS = ("params", "param_names", "lr", "initial_lr")


class StateMismatch(ValueError):
    """The saved state is for other parameters than the optimizer's (the text says which)."""


def parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` over the unwrapped model's canonical parameter names."""
    return {id(p): name for name, p in model.named_parameters()}


def state_with_names(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> dict[str, Any]:
    """The optimizer's state dict, each group naming its parameters (``param_names``)."""
    sd = optimizer.state_dict()
    for saved, group in zip(sd["param_groups"], optimizer.param_groups):
        saved["param_names"] = [names[id(p)] for p in group["params"]]
    return sd


def file_optim_config(config: Mapping[str, Any] | None, fallback: OptimConfig) -> OptimConfig:
    """The ``optim`` section a file's own config held (``fallback`` where it holds none usable)."""
    section = (config or {}).get("optim")
    if not isinstance(section, Mapping):
        return fallback
    known = {f.name for f in dataclasses.fields(OptimConfig)}
    try:
        return OptimConfig(**{k: v for k, v in section.items() if k in known})
    except (ConfigError, TypeError):
        return fallback


def positional_names(sd: Mapping[str, Any], model: nn.Module, made_by: OptimConfig) -> list[list[str]]:
    """Names for the slots of a state dict saved without them: the grouping ``made_by`` (the file's
    own optim config) makes of ``model``. StateMismatch when the group sizes differ."""
    names = parameter_names(model)
    groups = [[names[id(p)] for p in g["params"]] for g in parameter_groups(model, made_by)]
    saved = [len(g["params"]) for g in sd["param_groups"]]
    if saved != [len(g) for g in groups]:
        differ = "; ".join(f"group {i}: {a} in the checkpoint, {b} in the model"
                           for i, (a, b) in enumerate(zip(saved, [len(g) for g in groups])) if a != b)
        raise StateMismatch(f"saved by position (an earlier version's file), its parameter groups hold other counts "
                            f"({differ or f'{len(saved)} groups in the checkpoint, {len(groups)} in the model'})")
    return groups


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def load_by_name(optimizer: torch.optim.Optimizer, names: Mapping[int, str], sd: Mapping[str, Any],
                 saved_names: list[list[str]]) -> bool:
    """Load each parameter's saved state (``sd``'s slots named by ``saved_names``) into ``optimizer``,
    keeping the optimizer's own groups and hyperparameters. StateMismatch, naming the parameters,
    when the saved parameters are not the optimizer's or a state tensor's shape is not its
    parameter's. Returns whether the parameters were grouped otherwise in the file."""
    ours = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    flat_ours = [n for g in ours for n in g]
    flat_saved = [n for g in saved_names for n in g]
    only_saved = [n for n in flat_saved if n not in set(flat_ours)]
    only_ours = [n for n in flat_ours if n not in set(flat_saved)]
    if only_saved or only_ours:
        raise StateMismatch(f"it holds state for other parameters than the model's trainable ones: "
                            f"{len(only_saved)} only in the checkpoint ({_some(only_saved) or 'none'}), "
                            f"{len(only_ours)} only in the model ({_some(only_ours) or 'none'})")
    state = sd.get("state") or {}
    by_name = {}
    for i, name in enumerate(flat_saved):
        entry = state.get(i, state.get(str(i)))
        if entry:
            by_name[name] = entry
    params = {names[id(p)]: p for g in optimizer.param_groups for p in g["params"]}
    shapes = [f"{n}: {k} {tuple(v.shape)} in the checkpoint, {tuple(params[n].shape)} in the model"
              for n, entry in by_name.items() for k, v in entry.items()
              if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape != params[n].shape]
    if shapes:
        raise StateMismatch(f"its state has other shapes than the parameters ({'; '.join(shapes[:3])})")
    current = optimizer.state_dict()
    groups = current["param_groups"]
    saved_of = {tuple(sorted(n)): g for n, g in zip(saved_names, sd.get("param_groups") or [])}
    for ours_names, group in zip(ours, groups):
        # a group's entries that are no setting of the optimizer are its state: timm's LAMB counts
        # its steps per group ("step"), and its bias correction restarts at 1 without it
        saved = saved_of.get(tuple(sorted(ours_names)), {})
        group.update({k: v for k, v in saved.items() if k not in NOT_SETTINGS and k not in optimizer.defaults})
    optimizer.load_state_dict({"state": {i: by_name[n] for i, n in enumerate(flat_ours) if n in by_name},
                               "param_groups": groups})
    return [sorted(g) for g in saved_names] != [sorted(g) for g in ours]


def setting_changes(saved_groups: list[Mapping[str, Any]], groups: list[Mapping[str, Any]]) -> list[str]:
    """``key: old -> new`` for each hyperparameter the config changed against the file's groups (one
    value when every group agrees, else one per group); keys only one side knows are left out."""
    out = []
    for key in (groups[0] if groups else {}):
        if key in NOT_SETTINGS or not all(key in g for g in saved_groups):
            continue
        old, new = [g[key] for g in saved_groups], [g[key] for g in groups]
        if old == new:
            continue
        if len(old) == len(new) and len({repr(v) for v in old}) == 1 and len({repr(v) for v in new}) == 1:
            out.append(f"{key}: {old[0]!r} -> {new[0]!r}")
        else:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out
