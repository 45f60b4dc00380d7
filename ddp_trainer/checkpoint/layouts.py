"""Checkpoint layouts of the trainers users come from, and what their ``epoch`` means.

Each known layout names where the weights and the optimizer state are, and how its ``epoch`` entry
counts, normalised here to "the last finished epoch" (what ddp_trainer resumes after):

| layout | written by | weights | optimizer | ``epoch`` means |
|---|---|---|---|---|
| ``pytorch_examples`` | pytorch/examples ``imagenet/main.py`` | ``state_dict`` | ``optimizer`` | the next epoch to run (``epoch + 1`` is saved) |
| ``torchvision_references`` | torchvision ``references/classification/train.py`` | ``model`` | ``optimizer`` | the last finished epoch |
| ``timm`` | timm ``train.py`` (``version`` 2) | ``state_dict`` | ``optimizer`` | the last finished epoch (``version`` < 2: the next) |
| ``lightning`` | Lightning ``Trainer`` | ``state_dict`` (keys prefixed by the attribute) | ``optimizer_states[0]`` | the last finished epoch |
| ``classic`` | the classic recipe ``{"net", "optimizer", "epoch"}`` and ``{"model_state_dict"/"state_dict"/"model", ...}`` | that entry | ``optimizer`` | the last finished epoch |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

NEXT, DONE = "next epoch to run", "last finished epoch"


@dataclass(frozen=True)
class Layout:
    name: str
    weights_key: str
    epoch_means: str  # NEXT or DONE
    optimizer: Any = None
    scaler: Any = None
    arch: str | None = None  # the model name the file states, if any


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _arg(obj: Mapping[str, Any], name: str) -> Any:
    args = obj.get("args")
    return getattr(args, name, None) if args is not None else None


def detect(obj: Any) -> Layout | None:
    """The foreign layout of a loaded checkpoint mapping, or None (not one of these)."""
    if not isinstance(obj, Mapping):
        return None
    keys = set(obj)
    if ("pytorch-lightning_version" in keys or "optimizer_states" in keys) and _is_state_dict(obj.get("state_dict")):
        states = obj.get("optimizer_states") or []
        return Layout("lightning", "state_dict", DONE, optimizer=states[0] if states else None)
    if _is_state_dict(obj.get("state_dict")) and "version" in keys and "arch" in keys:
        means = DONE if int(obj.get("version") or 0) >= 2 else NEXT
        return Layout("timm", "state_dict", means, optimizer=obj.get("optimizer"), scaler=obj.get("amp_scaler"),
                      arch=_arg(obj, "model") or obj.get("arch"))
    if {"epoch", "arch", "state_dict", "best_acc1"} <= keys and _is_state_dict(obj["state_dict"]):
        return Layout("pytorch_examples", "state_dict", NEXT, optimizer=obj.get("optimizer"), arch=obj.get("arch"))
    if _is_state_dict(obj.get("model")) and "args" in keys and "epoch" in keys:
        return Layout("torchvision_references", "model", DONE, optimizer=obj.get("optimizer"),
                      scaler=obj.get("scaler"), arch=_arg(obj, "model"))
    if _is_state_dict(obj.get("net")):
        return Layout("classic", "net", DONE, optimizer=obj.get("optimizer"))
    for key in ("model_state_dict", "state_dict", "model"):
        if _is_state_dict(obj.get(key)):
            return Layout("classic", key, DONE, optimizer=obj.get("optimizer") or obj.get("optimizer_state_dict"))
    return None


def finished_epoch(obj: Mapping[str, Any], layout: Layout) -> int:
    """The last finished epoch (-1: none or unknown)."""
    epoch = obj.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        return -1
    return epoch - 1 if layout.epoch_means == NEXT else epoch
