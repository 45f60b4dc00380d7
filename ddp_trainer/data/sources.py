"""The sample-source contract: what the datasets, the decoded cache, ``check`` and the samplers may
ask of a split's samples, so that none of them learns where the bytes come from.

A source is the ordered, immutable list of one split's samples. :class:`.folder_index.FolderIndex`
(a class-folder tree) is one; a shard set is another. Sample ``i`` is the same picture with the
same label on every rank and every run that sees the same source (its ``fingerprint``), which is
what exact validation and bitwise resume rest on. A source pickles cheaply (rank 0 broadcasts it,
loader workers receive it) and opens whatever it reads lazily, in the process that reads.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable


@runtime_checkable
class SampleSource(Protocol):
    root: str  # where the samples live, as messages and the decoded cache's key name it
    classes: tuple[str, ...]  # class names; label k is classes[k]

    def __len__(self) -> int: ...

    @property
    def class_to_idx(self) -> dict[str, int]: ...

    @property
    def labels(self) -> Sequence[int]:
        """Every sample's label, in order."""

    def label(self, i: int) -> int: ...

    def rel(self, i: int) -> str:
        """Sample ``i``'s name relative to the split (``dog/001.jpg``): unique within the source,
        the same for a tree and the shards made from it; what ``without`` and ``check`` name."""

    def name(self, i: int) -> str:
        """What an error message calls sample ``i`` (a file's path; a shard and its member)."""

    def read(self, i: int) -> bytes:
        """Sample ``i``'s encoded bytes, unchanged; ImageError naming ``name(i)`` when they cannot be
        read or are not the bytes the source was built from."""

    def change_marks(self, lo: int, hi: int) -> list[str]:
        """One line per sample ``lo .. hi - 1`` that changes whenever its bytes may have (the
        decoded cache's key); cheap: no sample is read."""

    def fingerprint(self) -> dict[str, Any]:
        """The count and a hash of the (rel, label) list: what a mid-epoch resume must see again."""

    def subset(self, keep: Sequence[int]) -> "SampleSource":
        """The samples ``keep``, in that order, as a source of the same kind."""

    def without(self, bad_rels: set[str]) -> "SampleSource":
        """The source without the samples whose ``rel`` is in ``bad_rels`` (``data.bad_images=skip``)."""
