"""A shard set read from a real S3 server (SeaweedFS on loopback, tests/s3_server.py) against the
same shards on the local disk. Prints every figure and ratio; asserts nothing.

    python bench/remote_shards.py [--work DIR] [--images 3000] [--shard-mb 4] [--repeats 3] [--workers 0]

For each of: local shards, S3 through a cold cache (emptied before each pass) without and with the
prefetch of the next window (ddp_trainer.data.shard_prefetch, as the training loader iterates its
sampler), S3 through the warm cache (every shard already fetched; each pass opens them anew, as a
new run's processes do), the four passes interleaved --repeats times, one process reads and decodes
every training image once in data.sampler=shard_window's order (one rank, data.shard_window=4, as
with data.num_workers=0; ``--workers N``: the images decoded by N loader workers, forked for each
pass, while this process iterates the order, as training does): images/s (the best of --repeats
passes) and the ratio to the local shards. And the bytes the cold passes fetched (the cache's fetches.log) per byte of the training
shards. Needs the s3 and s3test extras (pip install -e ".[s3,s3test]").
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 4  # data.shard_window
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))


class _Decoded:
    """Sample ``i`` read and decoded (a loader worker's work); the item is nothing."""

    def __init__(self, index) -> None:  # type: ignore[no-untyped-def]
        self.index, self.cached = index, None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> int:
        from ddp_trainer.data.decode import decode_rgb

        decode_rgb(self.index.read(i), self.index.name(i), 89_478_485)
        return 0


WAITED: dict[str, list[float]] = {}  # seconds the reading thread spent in the store's shard_path, per pass


def _pass(index, order, prefetch: bool = False, workers: int = 0, kind: str = "") -> float:  # type: ignore[no-untyped-def]
    """Images/s of one read + decode pass over ``order``, shards opened anew; ``prefetch``: the
    order iterated through the prefetching sampler; ``workers``: decoded by that many loader workers.
    With ``kind`` (and no workers), the time the reading thread waited for the store is kept in WAITED."""
    from torch.utils.data import DataLoader

    from ddp_trainer.data import shard_set
    from ddp_trainer.data.shard_prefetch import PrefetchingSampler

    shard_set._close_beyond(0)  # a fresh process's view: every shard asked of the store again
    gc.collect()  # the last passes' clients closed here, not in a forked worker (on a loop it does not run)
    decoded = _Decoded(index)
    t = time.perf_counter()
    sampler = PrefetchingSampler(order, index, WINDOW) if prefetch else order
    if workers:
        for _ in DataLoader(decoded, batch_size=50, sampler=sampler, num_workers=workers, collate_fn=len,
                            multiprocessing_context="fork"):
            pass
    else:
        store, waited = index.store, [0.0]
        real = getattr(store, "shard_path")
        reader = threading.current_thread()

        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                if threading.current_thread() is reader:
                    waited[0] += time.perf_counter() - t0

        if kind:
            store.shard_path = timed
        try:
            for i in sampler:
                decoded[i]
        finally:
            if kind:
                del store.shard_path
        if kind:
            WAITED.setdefault(kind, []).append(waited[0])
    return len(order) / (time.perf_counter() - t)


def _fetched(cache: Path) -> int:
    from ddp_trainer.data.remote_shards import FETCH_LOG

    return sum(int(line.split()[3]) for log in cache.glob(f"*/{FETCH_LOG}") for line in log.read_text().splitlines())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--shard-mb", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="remote-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    import torch
    from s3_server import S3Server, why_missing
    from scale import _noise_tree

    from ddp_trainer.data.remote_shards import RemoteShardStore
    from ddp_trainer.data.samplers import shard_window_order
    from ddp_trainer.data.shard_set import ShardIndex
    from ddp_trainer.data.shard_store import LocalShardStore
    from ddp_trainer.data.shard_writer import shard_tree

    missing = why_missing()
    if missing:
        sys.exit(f"bench/remote_shards.py: {missing}")
    torch.set_num_threads(1)
    tree = _noise_tree(work / f"noise{a.images}", a.images)
    local = work / f"noise{a.images}.shards{a.shard_mb:g}"
    if not (local / "train.index.json").exists():
        shard_tree(tree, local, shard_size=int(a.shard_mb * 2**20))
    server = S3Server(work / "s3").start()
    try:
        for k, v in server.env().items():
            os.environ[k] = v
        url = server.upload(local, "bench/set")
        near = ShardIndex.open(LocalShardStore(local), "train")
        shards = torch.tensor(near.shard_ids.tolist(), dtype=torch.int64)
        order = shard_window_order(shards, 0, 0, 1, WINDOW).tolist()
        dataset = sum(near.shard_sizes)
        _pass(near, order[:300])  # the page cache and the decoder warmed for everyone
        cache = work / "cache"
        local, cold, ahead, warm, fetched = [], [], [], [], {"cold": [], "prefetch": []}
        for _ in range(a.repeats):  # interleaved, so that the machine's other load drifts over all four alike
            local.append(_pass(near, order, workers=a.workers))
            for rates, prefetch in ((cold, False), (ahead, True)):
                shutil.rmtree(cache, ignore_errors=True)
                remote = ShardIndex.open(RemoteShardStore(url, cache), "train")
                rates.append(_pass(remote, order, prefetch, a.workers, "prefetch" if prefetch else "cold"))
                fetched["prefetch" if prefetch else "cold"].append(_fetched(cache))
            warm.append(_pass(ShardIndex.open(RemoteShardStore(url, cache), "train"), order, workers=a.workers))
            assert _fetched(cache) == fetched["prefetch"][-1]  # the warm pass fetched nothing
        rates = {"local shards": max(local), "s3, cold cache, no prefetch": max(cold),
                 "s3, cold cache, prefetch": max(ahead), "s3, warm cache": max(warm)}
    finally:
        server.stop()
    base = rates["local shards"]
    load = os.getloadavg()
    print(f"{len(near)} 160x120 JPEGs in {len(near.shard_names)} shards of ~{a.shard_mb:g} MB ({dataset / 1e6:.1f} MB), "
          f"{f'{a.workers} loader worker(s)' if a.workers else 'one process'}, data.sampler=shard_window order, "
          f"best of {a.repeats}; load average "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)")
    for label, rate in rates.items():
        print(f"  {label}: {rate:.0f} images/s, {rate / base:.2f}x local (target >= 0.9x)")
    for kind, got in WAITED.items():
        print(f"  the reader waited for the store ({kind}), per pass: median {statistics.median(got):.3f} s, "
              f"{', '.join(f'{w:.2f}' for w in got)}")
    for kind, got in fetched.items():
        print(f"  bytes fetched per cold epoch ({kind}) / training shards' bytes: "
              f"{', '.join(f'{f / dataset:.3f}' for f in got)} (target <= 1.05)")


if __name__ == "__main__":
    main()
