"""The state registry: a checkpoint is assembled from named components and restored through them.

Each piece of training state (model, optimizer, scaler, schedule, loop counters, random generators,
EMA, the training-set check, the best ranking) is a component registered once, where it is built:
an object with ``save(ctx)`` and, when it is restored, ``load(value, ctx)``. Nothing else needs to
know about it: adding state is one ``register`` call (torchtitan's checkpointer, Lightning's
checkpoint connector).

Components receive what they need in a small context: :class:`SaveContext` (what this save marks)
and :class:`LoadContext` (the file being restored, and this run's ranks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .format import Checkpoint


@dataclass(frozen=True)
class SaveContext:
    """What a save records beyond the components' own state."""

    epoch_complete: bool = False  # the save marks the end of its epoch (the next run starts the next one)


@dataclass(frozen=True)
class LoadContext:
    """The checkpoint being restored, and who is restoring it."""

    checkpoint: Checkpoint
    world_size: int = 1
    rank: int = 0


class Component(Protocol):
    """A piece of training state. ``load`` is optional: a component without it is written but never
    restored (metadata, or state derived from the config)."""

    def save(self, ctx: SaveContext) -> Any:
        """Its state: a value stored under its name, or (``flat``) a mapping of top-level entries."""


@dataclass
class _Entry:
    component: Component
    every_rank: bool  # save runs collectives: every rank calls it, in registration order
    flat: bool  # its entries are top-level keys of the checkpoint, not one value under its name


class StateRegistry:
    """Named components of the training state, saved and restored in registration order."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def register(self, name: str, component: Component, *, every_rank: bool = False, flat: bool = False) -> None:
        if name in self._entries:
            raise ValueError(f"state component {name!r} registered twice")
        self._entries[name] = _Entry(component, every_rank, flat)

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def state_dict(self, ctx: SaveContext, is_main: bool) -> dict[str, Any] | None:
        """The checkpoint mapping on the main rank (None elsewhere). Every rank must call this: the
        ``every_rank`` components run collectives."""
        out: dict[str, Any] = {}
        for name, e in self._entries.items():
            if not (e.every_rank or is_main):
                continue
            value = e.component.save(ctx)
            if is_main:
                if e.flat:
                    out.update(value)
                else:
                    out[name] = value
        return out if is_main else None

    def load_state_dict(self, ctx: LoadContext) -> list[str]:
        """Restore every component the checkpoint has an entry for (a flat one gets all entries);
        returns the names restored."""
        entries = ctx.checkpoint.entries
        done = []
        for name, e in self._entries.items():
            load = getattr(e.component, "load", None)
            if load is None:
                continue
            if e.flat:
                load(entries, ctx)
            elif entries.get(name) is not None:
                load(entries[name], ctx)
            else:
                continue
            done.append(name)
        return done
