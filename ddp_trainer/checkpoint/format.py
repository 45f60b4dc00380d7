"""The checkpoint format: its keys, its version, its checksum, and every rule read from a file.

A checkpoint is one ``torch.save`` file of one flat mapping, loadable with ``weights_only=True``.
Version 1's top-level keys (as written since format version 1; a file may lack the optional ones):

| key | written by | what |
|---|---|---|
| ``format``, ``format_version`` | :func:`meta_entries` | ``"ddp_trainer.checkpoint"``, 1 |
| ``monitor``, ``class_to_idx``, ``model_name``, ``config``, ``world_size``, ``torch_version`` | :func:`meta_entries` | what the run was |
| ``model`` | the model | canonical state dict (no ``module.`` / ``_orig_mod.``), CPU tensors |
| ``optimizer`` | the optimizer | torch's state dict, each group with ``param_names`` (see :func:`optimizer_param_names`) |
| ``scheduler``, ``scaler`` | their components | state dicts (``scaler`` None without fp16) |
| ``epoch``, ``position``, ``epoch_complete``, ``step``, ``train_loss_sum``, ``train_loss_count`` | the loop state | where the run is |
| ``best``, ``best_k`` | the best ranking | the best monitored value; the K best ``[value, epoch]`` |
| ``train_data`` | the training-set check | ``{"count", "sha256"}`` of the index |
| ``train_order`` (optional) | the sampler check | ``{"sampler", ...}``: what ``position`` counts in (absent: ``plan``) |
| ``rng`` | the random generators | one ``{"torch", "cuda"?}`` per rank |
| ``model_ema`` (optional) | the EMA | ``{"weights", "n_averaged", "decay"}`` (another trainer's: ``n_averaged`` / ``decay`` may be None) |
| ``payload_sha256`` (optional) | the writer | :func:`payload_digest` of everything else |

Files of other trainers are turned into these keys by :mod:`.layouts`; :class:`Checkpoint` is a file
of any accepted kind, read and normalised, with the rules below as properties.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..config import MONITORABLE_METRICS
from ..errors import CheckpointError
from .layouts import Layout

FORMAT = "ddp_trainer.checkpoint"
FORMAT_VERSION = 1
CHECKSUM_KEY = "payload_sha256"
OURS = "ddp_trainer"  # Checkpoint.kind of this project's files


def meta_entries(*, monitor: str, class_to_idx: Mapping[str, int], model_name: str, config: dict[str, Any],
                 world_size: int) -> dict[str, Any]:
    """The entries that say what wrote the file and how (never restored; checked on resume)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "monitor": monitor,
            "class_to_idx": dict(class_to_idx), "model_name": model_name, "config": config,
            "world_size": world_size, "torch_version": str(torch.__version__)}


def payload_digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes, every other value's
    repr, in key order. Written with each checkpoint and checked on reading, so that corruption that
    still unpickles (zeroed or flipped bytes inside a tensor) is caught, not trained on."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
    elif isinstance(obj, Mapping):
        h.update(f"M{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode("utf-8", "backslashreplace"))
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(repr(obj).encode("utf-8", "backslashreplace"))


def with_checksum(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` plus its :data:`CHECKSUM_KEY` (our files only; others are written as they are)."""
    return {**state, CHECKSUM_KEY: payload_digest(state)} if state.get("format") == FORMAT else dict(state)


def checksum_matches(obj: Mapping[str, Any]) -> bool:
    """True when the file carries no checksum (older files) or its content still matches it."""
    saved = obj.get(CHECKSUM_KEY)
    return saved is None or payload_digest({k: v for k, v in obj.items() if k != CHECKSUM_KEY}) == saved


# -- the rules read from a file ------------------------------------------------------------------------

def resume_point(entries: Mapping[str, Any]) -> tuple[int, int]:
    """(epoch, samples of it consumed) a run resumed from ``entries`` continues at: the epoch after
    a complete one, else the same epoch at its position. A file without an ``epoch`` (a plain state
    dict) starts at epoch 0."""
    epoch = -1 if entries.get("epoch") is None else int(entries["epoch"])
    if bool(entries.get("epoch_complete", True)):
        return epoch + 1, 0
    return epoch, int(entries.get("position", 0) or 0)


def resume_key(entries: Mapping[str, Any]) -> tuple[int, int, int]:
    """How ``resume=auto`` orders files, newest first: (epoch, samples of it, step) a run resumed from
    ``entries`` continues at (step -1 where the file has none)."""
    step = entries.get("step")
    return (*resume_point(entries), step if isinstance(step, int) else -1)


def rng_fits(entries: Mapping[str, Any], world_size: int) -> bool:
    """The file's per-rank generator states can be restored: one for each rank of this run."""
    states = entries.get("rng")
    return states is not None and len(states) == world_size


def optimizer_param_names(entry: Mapping[str, Any] | None) -> list[list[str]] | None:
    """The parameter names of each group of an ``optimizer`` entry (the model's canonical names, in
    the order of the group's slots), by which its per-parameter state is matched to the model's
    parameters. Written in each group's ``param_names`` (torch's own key for them) since the state is
    kept by name; an extension of version 1 that older readers ignore. None: a file without them
    (this project's earlier version-1 files, other trainers'), whose state is matched by position."""
    groups = (entry or {}).get("param_groups") or []
    if not groups or not all(isinstance(g, Mapping) and isinstance(g.get("param_names"), list) for g in groups):
        return None
    return [[str(n) for n in g["param_names"]] for g in groups]


def monitored_metric(entries: Mapping[str, Any]) -> str | None:
    """The metric the file's ``best`` / ``best_k`` were ranked by (None: unknown, a foreign file)."""
    name = entries.get("monitor")
    return name if name in MONITORABLE_METRICS else None


@dataclass
class Checkpoint:
    """A checkpoint file of any accepted kind, read onto the CPU and normalised: ``entries`` holds
    version 1's keys (those a foreign file has an equivalent for), a foreign file's wrapper prefixes
    stripped (:func:`~.weights.strip_wrapper_prefixes`)."""

    path: str
    kind: str  # "ddp_trainer" | "state_dict" | "pickled_model" | a foreign layout's name
    entries: dict[str, Any]
    renamed: int = 0  # keys whose wrapper prefixes were stripped
    layout: Layout | None = None  # a foreign file's layout (what its epoch meant, its arch)
    _start: tuple[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._start = resume_point(self.entries)

    @property
    def ours(self) -> bool:
        return self.kind == OURS

    @property
    def model(self) -> dict[str, torch.Tensor]:
        return self.entries["model"]

    @property
    def optimizer(self) -> dict[str, Any] | None:
        return self.entries.get("optimizer")

    @property
    def epoch(self) -> int:
        """The epoch the file was taken in (-1: none)."""
        return -1 if self.entries.get("epoch") is None else int(self.entries["epoch"])

    @property
    def start_epoch(self) -> int:
        """The epoch a resumed run continues in."""
        return self._start[0]

    @property
    def start_position(self) -> int:
        return self._start[1]

    def get(self, key: str, default: Any = None) -> Any:
        return self.entries.get(key, default)

    @property
    def class_to_idx(self) -> dict[str, int] | None:
        return self.entries.get("class_to_idx")

    @property
    def model_name(self) -> str | None:
        return self.entries.get("model_name")

    @property
    def config(self) -> dict[str, Any] | None:
        return self.entries.get("config")

    def weights(self, ema: bool = False) -> dict[str, torch.Tensor]:
        """The model weights, or with ``ema`` the EMA's (runs with ``train.ema_decay``)."""
        if not ema:
            return self.model
        entry = self.entries.get("model_ema")
        if not entry:
            how = "train.ema_decay" if self.ours else f"an EMA (the {self.kind} trainer's --model-ema)"
            raise CheckpointError(f"checkpoint '{self.path}' holds no EMA weights (it was trained without "
                                  f"{how}); leave out --ema")
        return entry["weights"]  # canonical: written so, or stripped when a foreign file was read
