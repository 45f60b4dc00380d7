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

Their EMA weights, when the run kept an EMA: torchvision's ``--model-ema`` writes ``model_ema`` (the
``ExponentialMovingAverage`` wrapper's state dict: ``module.``-prefixed keys plus ``n_averaged``);
timm's ``--model-ema`` writes ``state_dict_ema`` (the averaged model's own keys; no update count).

Each layout is an adapter: :meth:`Layout.entries` turns its file into the format's version-1 entries
(:mod:`.format`), so that everything after reading sees one format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .weights import is_state_dict, strip_wrapper_prefixes

NEXT, DONE = "next epoch to run", "last finished epoch"


@dataclass(frozen=True)
class Layout:
    """Where a foreign file keeps what, and what its ``epoch`` meant."""

    name: str
    weights_key: str
    epoch_means: str  # NEXT or DONE
    optimizer_key: str | None = None
    scaler_key: str | None = None
    arch: str | None = None  # the model name the file states, if any
    epoch_entry: Any = None  # the file's own ``epoch`` value, as written
    ema_key: str | None = None  # where the trainer keeps its EMA weights, when it kept one

    def finished_epoch(self) -> int:
        """The last finished epoch (-1: none or unknown)."""
        epoch = self.epoch_entry
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            return -1
        return epoch - 1 if self.epoch_means == NEXT else epoch

    def entries(self, obj: Mapping[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
        """The file as version-1 entries (see :mod:`.format`): weights, optimizer and scaler state,
        and the epoch as finished, so that a resume continues after it."""
        optimizer = obj.get(self.optimizer_key) if self.optimizer_key else None
        if self.name == "lightning":
            optimizer = optimizer[0] if optimizer else None  # optimizer_states: one per optimizer
        return {"model": weights, "optimizer": optimizer,
                "scaler": obj.get(self.scaler_key) if self.scaler_key else None,
                "epoch": self.finished_epoch(), "epoch_complete": True, "model_ema": self.ema_entry(obj)}

    def ema_entry(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        """The file's EMA as the format's ``model_ema`` entry ``{"weights", "n_averaged", "decay"}``
        (None: the run kept none), its wrapper's prefix stripped (torchvision's ``module.``). ``n_averaged`` is None where the trainer does not count updates
        (timm); ``decay`` is the one the run used, where its arguments say so."""
        sd = obj.get(self.ema_key) if self.ema_key else None
        if not isinstance(sd, Mapping) or not sd:
            return None
        weights, _ = strip_wrapper_prefixes({k: v for k, v in sd.items() if k != "n_averaged"})
        if not is_state_dict(weights):
            return None
        count = sd.get("n_averaged")
        return {"weights": weights, "n_averaged": None if count is None else int(count),
                "decay": _ema_decay(obj, self.name)}


def _arg(obj: Mapping[str, Any], name: str) -> Any:
    args = obj.get("args")
    if isinstance(args, Mapping):
        return args.get(name)
    return getattr(args, name, None) if args is not None else None


def _ema_decay(obj: Mapping[str, Any], layout: str) -> float | None:
    """The per-update decay the run used. torchvision's train.py rescales ``--model-ema-decay`` by
    the images per EMA update over the epochs (``alpha = min(1, (1 - decay) x world x batch x steps /
    epochs)``); timm uses ``--model-ema-decay`` as it is."""
    decay = _arg(obj, "model_ema_decay")
    if not isinstance(decay, (int, float)):
        return None
    if layout == "torchvision_references":
        parts = [_arg(obj, k) for k in ("world_size", "batch_size", "model_ema_steps", "epochs")]
        if not all(isinstance(v, (int, float)) and v > 0 for v in parts):
            return None
        world, batch, steps, epochs = parts
        return 1.0 - min(1.0, (1.0 - decay) * world * batch * steps / epochs)
    return float(decay)


def detect(obj: Any) -> Layout | None:
    """The foreign layout of a loaded checkpoint mapping, or None (not one of these)."""
    if not isinstance(obj, Mapping):
        return None
    keys = set(obj)
    epoch = obj.get("epoch")
    if ("pytorch-lightning_version" in keys or "optimizer_states" in keys) and is_state_dict(obj.get("state_dict")):
        return Layout("lightning", "state_dict", DONE, "optimizer_states", epoch_entry=epoch)
    if is_state_dict(obj.get("state_dict")) and "version" in keys and "arch" in keys:
        means = DONE if int(obj.get("version") or 0) >= 2 else NEXT
        return Layout("timm", "state_dict", means, "optimizer", "amp_scaler",
                      arch=_arg(obj, "model") or obj.get("arch"), epoch_entry=epoch, ema_key="state_dict_ema")
    if {"epoch", "arch", "state_dict", "best_acc1"} <= keys and is_state_dict(obj["state_dict"]):
        return Layout("pytorch_examples", "state_dict", NEXT, "optimizer", arch=obj.get("arch"), epoch_entry=epoch)
    if is_state_dict(obj.get("model")) and "args" in keys and "epoch" in keys:
        return Layout("torchvision_references", "model", DONE, "optimizer", "scaler", arch=_arg(obj, "model"),
                      epoch_entry=epoch, ema_key="model_ema")
    if is_state_dict(obj.get("net")):
        return Layout("classic", "net", DONE, "optimizer", epoch_entry=epoch)
    for key in ("model_state_dict", "state_dict", "model"):
        if is_state_dict(obj.get(key)):
            opt = "optimizer" if obj.get("optimizer") else "optimizer_state_dict"
            return Layout("classic", key, DONE, opt, epoch_entry=epoch)
    return None
