"""Training state that components own: :class:`TrainState` (the loop's counters) and the
:class:`StateRegistry` that a checkpoint is assembled from and restored through.

Each piece of state (model, optimizer, scaler, schedule, loop counters, random generators, later an
EMA of the weights) registers a ``save`` and a ``load`` under its name once, where it is built;
nothing else needs to know about it. This is torchtitan's checkpointer / Lightning's checkpoint
connector pattern: adding a component is one ``register`` call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass
class TrainState:
    """Where the loop is: the epoch running (or next to run), samples of it consumed, optimizer steps
    taken, the best monitored figure, and the epoch's training-loss sums over every rank before this
    process started the epoch (a mid-epoch resume), so that the epoch's ``train_loss`` equals an
    uninterrupted run's."""

    epoch: int = 0
    position: int = 0
    step: int = 0
    best: float | None = None
    best_k: list = field(default_factory=list)  # checkpoint.keep_best > 1: [[value, epoch], ...], best first
    loss_sum: float = 0.0
    loss_count: float = 0.0

    def state_dict(self, *, epoch_complete: bool, loss_sum: float, loss_count: float) -> dict[str, Any]:
        """The checkpoint's loop entries (top-level keys: the file format of version 1).
        ``loss_sum`` / ``loss_count``: the epoch's sums up to ``position``, over every rank."""
        return {"epoch": self.epoch, "position": self.position, "epoch_complete": epoch_complete,
                "step": self.step, "best": self.best, "best_k": [list(e) for e in self.best_k], "train_loss_sum": loss_sum, "train_loss_count": loss_count}

    def load_state_dict(self, entries: Mapping[str, Any]) -> None:
        """Continue after the checkpoint: the next epoch after a complete one, else the same epoch at
        its position, with its loss sums. Foreign files may lack entries (a fresh start for those)."""
        epoch = -1 if entries.get("epoch") is None else int(entries["epoch"])
        complete = bool(entries.get("epoch_complete", True))
        self.epoch = epoch + 1 if complete else epoch
        self.position = 0 if complete else int(entries.get("position", 0))
        self.step = int(entries.get("step", 0) or 0)
        self.best = entries.get("best")
        self.best_k = [list(e) for e in entries.get("best_k") or []]
        self.loss_sum = 0.0 if complete else float(entries.get("train_loss_sum") or 0.0)
        self.loss_count = 0.0 if complete else float(entries.get("train_loss_count") or 0.0)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.position, self.loss_sum, self.loss_count = epoch, 0, 0.0, 0.0


@dataclass
class _Component:
    name: str
    save: Callable[[], Any]
    load: Callable[[Any], None] | None
    every_rank: bool  # save runs collectives: every rank calls it, in registration order
    flat: bool  # its entries are top-level keys of the checkpoint (a mapping), not one value under `name`


class StateRegistry:
    """Named components of the training state."""

    def __init__(self) -> None:
        self._components: dict[str, _Component] = {}

    def register(self, name: str, save: Callable[[], Any], load: Callable[[Any], None] | None = None, *,
                 every_rank: bool = False, flat: bool = False) -> None:
        """``save()`` returns the component's state (a mapping of top-level entries when ``flat``);
        ``load(value)`` restores it (given the whole checkpoint mapping when ``flat``); ``None``: the
        component is written but never restored (metadata, or state derived from the config)."""
        if name in self._components:
            raise ValueError(f"state component {name!r} registered twice")
        self._components[name] = _Component(name, save, load, every_rank, flat)

    @property
    def names(self) -> list[str]:
        return list(self._components)

    def state_dict(self, is_main: bool) -> dict[str, Any] | None:
        """The checkpoint mapping on the main rank (None elsewhere). Every rank must call this: the
        ``every_rank`` components run collectives."""
        out: dict[str, Any] = {}
        for c in self._components.values():
            if not (c.every_rank or is_main):
                continue
            value = c.save()
            if is_main:
                if c.flat:
                    out.update(value)
                else:
                    out[c.name] = value
        return out if is_main else None

    def load_state_dict(self, entries: Mapping[str, Any]) -> list[str]:
        """Restore every component with an entry in ``entries``; returns the names restored."""
        done = []
        for c in self._components.values():
            if c.load is None:
                continue
            if c.flat:
                c.load(entries)
            elif entries.get(c.name) is not None:
                c.load(entries[c.name])
            else:
                continue
            done.append(c.name)
        return done
