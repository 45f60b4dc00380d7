"""Model weights between files and modules: canonical state dicts (no wrapper prefixes), and
loading one into a model of any wrapper with errors that say what does not fit and how to fix it."""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from ..launch.mode import unwrap
from ..models import classifier_head

log = logging.getLogger("ddp_trainer")

WRAPPER_SEGMENTS = ("module", "_orig_mod")  # DataParallel / DDP, torch.compile


def canonical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's state dict as CPU tensors (copies)."""
    return {k: v.detach().cpu().clone() for k, v in canonical_tensors(model).items()}


def canonical_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's state dict: its live tensors, wherever they are (what a checkpoint save
    hands to the writer, which makes the one CPU copy)."""
    return {k: v.detach() for k, v in unwrap(model).state_dict().items()}


def is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of names to tensors."""
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_wrapper_prefixes(sd: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """Remove the prefix a wrapper put on the keys of a foreign file: a leading ``module.``
    (DataParallel, DDP) or ``_orig_mod.`` (torch.compile), repeated for nested wrappers, where every
    key starts with it (a wrapper prefixes all of them). Never inside a key, nor where only some keys
    start with it: those are the model's own names (a child named ``module``). Returns the keys and
    how many were renamed."""
    keys = list(sd)
    depth = 0
    while keys:
        segment = keys[0].split(".", 1)[0]
        if segment not in WRAPPER_SEGMENTS or not all(k.startswith(segment + ".") for k in keys):
            break
        keys = [k[len(segment) + 1:] for k in keys]
        depth += 1
    if not depth:
        return dict(sd), 0
    return dict(zip(keys, sd.values())), len(keys)


def fit_prefix(sd: Mapping[str, Any], want: Iterable[str]) -> tuple[dict[str, Any], str]:
    """``sd`` with one leading prefix stripped when that makes its keys exactly the model's (a
    LightningModule's ``model.``, any wrapper attribute); returns the prefix ("" when none)."""
    want = set(want)
    keys = list(sd)
    if not keys or set(keys) == want:
        return dict(sd), ""
    first = keys[0].split(".")
    for depth in range(1, min(4, len(first))):
        prefix = ".".join(first[:depth]) + "."
        if all(k.startswith(prefix) for k in keys) and {k[len(prefix):] for k in keys} == want:
            return {k[len(prefix):]: v for k, v in sd.items()}, prefix
    return dict(sd), ""


def common_prefix(keys: list[str]) -> str:
    """The first key segment (with its dot) when every key starts with it, else ""."""
    first = keys[0].split(".")[0] + "." if keys else ""
    return first if first and all(k.startswith(first) for k in keys) else ""


def output_count(sd: Mapping[str, torch.Tensor]) -> int:
    """The number of classes of a state dict: the rows of its last 2-D weight (the classifier's)."""
    last = [v for k, v in sd.items() if k.endswith("weight") and v.ndim == 2]
    if not last:
        raise CheckpointError("cannot tell the number of classes of this checkpoint")
    return int(last[-1].shape[0])


def load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], *, skip_prefixes: Iterable[str] = (),
                 source: str = "checkpoint") -> dict[str, list[str]]:
    """Load a canonical state dict into ``model`` (any wrapper), strictly except ``skip_prefixes``.

    A single leading prefix is stripped when that makes the keys fit exactly (logged). Raises
    CheckpointError naming the missing / unexpected / mis-shaped keys, and saying so when only the
    classifier head differs (fine-tuning: model.init_from) or the keys carry a prefix.
    """
    target = unwrap(model)
    skip = tuple(skip_prefixes)
    want = target.state_dict()
    sd, prefix = fit_prefix(sd, want)
    if prefix:
        log.info("%s: keys carry the prefix %r (a wrapper's attribute); stripped it to fit the model", source, prefix)
    sd = {k: v for k, v in sd.items() if not k.startswith(skip)} if skip else dict(sd)
    missing = [k for k in want if k not in sd and not (skip and k.startswith(skip))]
    unexpected = [k for k in sd if k not in want]
    shapes = [k for k in sd if k in want and tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        head = tuple(classifier_head(target))
        if not missing and not unexpected and all(k.startswith(head) for k in shapes):
            k = next(k for k in shapes if k.endswith("weight")) if any(k.endswith("weight") for k in shapes) else shapes[0]
            raise CheckpointError(
                f"{source}: only the classifier head differs ({k}: {tuple(sd[k].shape)} in the checkpoint, "
                f"{tuple(want[k].shape)} in the model: it was trained on {sd[k].shape[0]} classes, the data has "
                f"{want[k].shape[0]}); to fine-tune from these weights use model.init_from=PATH (the head starts new)")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} with other shapes (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(want[k].shape)})")
        theirs = common_prefix(list(sd))
        hint = (f"the checkpoint's keys all start with {theirs!r} and the model's do not: strip it "
                f"(ddp-trainer convert IN OUT --strip-prefix {theirs})" if theirs and not common_prefix(list(want))
                else "use the model.name the checkpoint was trained with")
        raise CheckpointError(f"{source} does not fit model.name's model: {'; '.join(parts)}; {hint}")
    target.load_state_dict(sd, strict=not skip)
    return {"missing": missing, "unexpected": unexpected}
