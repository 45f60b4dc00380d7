"""Fetching a remote shard set's next shards while the current ones are read.

A loader's sampler is iterated in the training process, ahead of the loader workers (by
``num_workers x prefetch_factor`` batches). :class:`PrefetchingSampler` wraps it where the
dataset reads a :class:`.shard_set.ShardIndex` whose store can ``prefetch`` (a
:class:`.remote_shards.RemoteShardStore`; a local set is read in place and left alone): it yields
exactly what the sampler yields, in the same order, and watches the shards of those samples. Call
``S`` the distinct shards in the order of their first sample in this pass; when it yields a sample of
``S[p]`` (the furthest yet), it reads the sampler ahead far enough to know ``S[p+1] .. S[p+window]``
and queues them to one background thread, which fetches them through the store (the same locked,
checked, atomic fetch as a read's: a worker that needs a shard being prefetched waits on its lock,
then reads that copy). So it is never more than one window of shards ahead of the samples handed
out, and works for any sampler (``shard_window`` is the one whose next shards are few and known).

- A prefetched shard not reached yet is marked used again every few seconds, so that the cache's
  eviction (least recently used, never one used within ``GRACE_S``) keeps it until it is read.
- A failed prefetch is logged at debug and ends this pass's prefetching: the worker's own fetch of
  that shard then retries and raises the real error (one line, exit 2), or succeeds.
- The thread is a daemon: at the end of the pass it finishes the fetch in flight (a fetch the
  workers wait for anyway) and ends, before anything forks the next workers; a pass dropped early
  (an error, a stop) only tells it to stop, and never waits for it.
"""
from __future__ import annotations

import logging
import operator
import queue
import threading
import time
from collections import deque
from typing import Any, Iterable, Iterator

log = logging.getLogger("ddp_trainer")

# how often a prefetched shard not reached yet is marked used again: well within the eviction's
# grace period (remote_shards.GRACE_S, not imported here: that module needs the optional fsspec)
TOUCH_S = 3.0


def shard_source(dataset: Any) -> Any:
    """The :class:`.shard_set.ShardIndex` that ``dataset``'s items are read from through a store
    that can prefetch, or None (a folder tree, a local shard set, a decoded cache)."""
    inner = getattr(dataset, "cpu", dataset)  # DeviceDecodeDataset wraps the FolderDataset
    if getattr(inner, "cached", None) is not None:
        return None  # the pixels come from the decoded cache: no shard is read while training
    index = getattr(inner, "index", None)
    store = getattr(index, "store", None)
    if getattr(store, "prefetch", None) is None or getattr(index, "shard_ids", None) is None:
        return None
    return index


def prefetching(sampler: Iterable[Any], dataset: Any, window: int) -> Iterable[Any]:
    """``sampler`` itself, or a :class:`PrefetchingSampler` over it when ``dataset`` reads a remote
    shard set."""
    index = shard_source(dataset)
    return sampler if index is None else PrefetchingSampler(sampler, index, window)


class PrefetchingSampler:
    """``inner``'s items, unchanged, with the next ``window`` shards of ``index`` fetched ahead
    (see the module docstring). Items are sample indices, :class:`.samplers.SampleKey` s, or lists
    of either (a batch sampler's)."""

    def __init__(self, inner: Iterable[Any], index: Any, window: int) -> None:
        self.inner = inner
        self.index = index
        self.window = max(1, int(window))

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        return _ahead(iter(self.inner), self.index, self.window)


def _indices(item: Any) -> list[int]:
    index = getattr(item, "index", None)
    if isinstance(index, int):  # a SampleKey (a tuple's own .index is a method)
        return [index]
    if isinstance(item, (list, tuple)):
        return [i for sub in item for i in _indices(sub)]
    return [operator.index(item)]


def _ahead(items: Iterator[Any], index: Any, window: int) -> Iterator[Any]:
    shard_of = index.shard_ids
    position: dict[int, int] = {}  # shard -> its place in S
    sequence: list[int] = []  # S: the shards in the order of their first sample
    buffer: deque[tuple[Any, int]] = deque()  # items read ahead, each with its furthest shard's place
    fetcher = _Fetcher(index)
    ended, reached, queued = False, -1, 0

    def read_one() -> bool:
        nonlocal ended
        try:
            item = next(items)
        except StopIteration:
            ended = True
            return False
        furthest = -1
        for i in _indices(item):
            k = int(shard_of[i])
            p = position.get(k)
            if p is None:
                p = position[k] = len(sequence)
                sequence.append(k)
            furthest = max(furthest, p)
        buffer.append((item, furthest))
        return True

    finished = False
    try:
        while buffer or (not ended and read_one()):
            item, furthest = buffer.popleft()
            if furthest > reached:
                fetcher.reach(sequence[reached + 1:furthest + 1])
                reached = furthest
                while not ended and len(sequence) <= reached + window and read_one():
                    pass
                for p in range(max(queued, reached + 1), min(len(sequence), reached + window + 1)):
                    fetcher.put(sequence[p])
                    queued = p + 1
            yield item
        finished = True
    finally:
        fetcher.close(wait=finished)


class _Fetcher:
    """The background thread of one pass: fetches the shards put to it, in order, one at a time."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.store = index.store
        self.jobs: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.pending: set[int] = set()  # prefetched, not reached by the samples handed out yet
        self.done: set[int] = set()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def put(self, shard: int) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="shard-prefetch", daemon=True)
            self.thread.start()
        self.jobs.put(shard)

    def reach(self, shards: list[int]) -> None:
        """The samples handed out reach these shards: their readers mark them used from now on."""
        with self.lock:
            self.done.update(shards)
            self.pending.difference_update(shards)

    def close(self, wait: bool) -> None:
        if self.thread is None:
            return
        if not wait:
            self.stop.set()
        self.jobs.put(None)
        if wait:
            self.thread.join()

    def _fetch(self, k: int) -> None:
        ix = self.index
        self.store.prefetch(ix.shard_names[k], ix.shard_sizes[k], ix.shard_sha256[k])

    def _run(self) -> None:
        last_touch = time.monotonic()
        while not self.stop.is_set():
            try:
                k = self.jobs.get(timeout=TOUCH_S)
            except queue.Empty:
                k = -1
            if k is None:
                return
            try:
                if k >= 0:
                    self._fetch(k)
                    with self.lock:
                        if k not in self.done:
                            self.pending.add(k)
                if time.monotonic() - last_touch >= TOUCH_S:
                    last_touch = time.monotonic()
                    with self.lock:
                        touch = sorted(self.pending)
                    for shard in touch:  # a cache hit: its mtime becomes now
                        self._fetch(shard)
            except Exception as exc:  # noqa: BLE001 - the worker's own fetch raises the real error
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                log.debug("shard prefetch stopped: %s: %s (the readers fetch for themselves)", type(exc).__name__,
                          first)
                return
