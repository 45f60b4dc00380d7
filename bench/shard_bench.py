"""Shard sets against the class-folder tree. Prints every figure and ratio; asserts nothing.

    python bench/shard_bench.py [--work DIR] [--what index,read,write] [--samples 1281167] [--images 6000]

index: the start-up spent on a split's index (``ShardIndex.open``: the JSON and the sample table,
       cold in a fresh process and warm) for an ImageNet-shaped table of --samples entries (1,000
       classes, ImageNet's ``nXXXXXXXX/nXXXXXXXX_N.JPEG`` names), and the file count a shard set of
       ImageNet's 140 GB at 512 MB a shard has, against the tree's.
read:  images/s of a read + decode pass (one process, data.max_image_pixels' default) over the same
       --images noisy 160x120 JPEGs (bench/scale.py's noise tree) from the tree and from its shards.
write: ``ddp-trainer shard`` of that tree (1 and 2 workers; and the writer in-process, without the
       interpreter's start and imports) in MB/s against ``tar cf`` of it.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
PY = sys.executable


def bench_index(work: Path, n: int) -> None:
    from ddp_trainer.data.shard_format import ShardEntry, Table, index_json, index_name
    from ddp_trainer.fsutil import atomic_write_bytes
    import numpy as np

    folder = work / f"index{n}"
    if not (folder / index_name("train")).exists():
        folder.mkdir(parents=True, exist_ok=True)
        per = -(-n // 1000)
        rels = [f"n{c:08d}/n{c:08d}_{k}.JPEG" for c in range(1000) for k in range(per)][:n]
        labels = [i // per for i in range(n)]
        shards = 280
        shard = np.arange(n) * shards // n
        table = Table.build(shard, np.arange(n) * 1024 + 512, np.full(n, 110_000), labels, np.zeros(n), rels)
        raw = table.to_bytes()
        atomic_write_bytes(folder / "train.samples.bin", raw)
        atomic_write_bytes(folder / index_name("train"), index_json(
            "train", [f"n{c:08d}" for c in range(1000)],
            [ShardEntry(f"train-{k:06d}.tar", int((shard == k).sum()), 512 << 20, "0" * 64) for k in range(shards)],
            "train.samples.bin", hashlib.sha256(raw).hexdigest()))
    code = ("import time, sys; t=time.perf_counter(); from ddp_trainer.data.shard_set import ShardIndex; "
            "from ddp_trainer.data.shard_store import LocalShardStore; t0=time.perf_counter(); "
            f"i=ShardIndex.open(LocalShardStore({str(folder)!r}), 'train'); t1=time.perf_counter(); "
            "i2=ShardIndex.open(LocalShardStore(%r), 'train'); t2=time.perf_counter(); "
            "print(len(i), t1-t0, t2-t1)" % str(folder))
    subprocess.run(["sh", "-c", "sync; echo 1 > /proc/sys/vm/drop_caches"], stderr=subprocess.DEVNULL)
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    count, first, again = int(out[0]), float(out[1]), float(out[2])
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"index: {count} samples, index files {size / 1e6:.1f} MB: first open {first:.3f} s "
          f"(target <= 0.1 s; folder scan 3.3 s: {3.3 / first:.0f}x less), again {again:.3f} s")
    dataset = 140e9
    print(f"files: ImageNet's ~{dataset / 1e9:.0f} GB at 512 MB a shard: {int(dataset // (512 << 20)) + 1} shards "
          f"+ 2 index files, against 1,281,167 files in the tree")


def _pass(index, limit: int) -> float:  # type: ignore[no-untyped-def]
    from ddp_trainer.data.decode import decode_rgb

    t = time.perf_counter()
    for i in range(min(limit, len(index))):
        decode_rgb(index.read(i), index.name(i), 89_478_485)
    return min(limit, len(index)) / (time.perf_counter() - t)


def bench_read(work: Path, images: int) -> Path:
    from scale import _noise_tree

    from ddp_trainer.data.folder_index import scan
    from ddp_trainer.data.shard_set import ShardIndex
    from ddp_trainer.data.shard_store import LocalShardStore
    from ddp_trainer.data.shard_writer import shard_tree

    tree = _noise_tree(work / f"noise{images}", images)
    shards = work / f"noise{images}.shards"
    if not (shards / "train.index.json").exists():
        shard_tree(tree, shards)
    a, b = scan(tree / "train"), ShardIndex.open(LocalShardStore(shards), "train")
    _pass(a, 200), _pass(b, 200)  # warm the page cache for both
    tree_rate = max(_pass(a, images) for _ in range(2))
    shard_rate = max(_pass(b, images) for _ in range(2))
    print(f"read+decode, {len(a)} 160x120 JPEGs, one process, page cache warm: tree {tree_rate:.0f} images/s, "
          f"shards {shard_rate:.0f} images/s, ratio {shard_rate / tree_rate:.2f} (target >= 1)")
    return tree


def bench_write(work: Path, images: int) -> None:
    from scale import _noise_tree

    tree = _noise_tree(work / f"noise{images}", images)
    size = sum(p.stat().st_size for p in (tree / "train").rglob("*") if p.is_file()) + \
        sum(p.stat().st_size for p in (tree / "val").rglob("*") if p.is_file())
    out = {}
    for label, cmd in [("tar cf", ["tar", "cf", str(work / "t.tar"), "-C", str(tree), "train", "val"]),
                       ("shard, 1 worker", [PY, "-m", "ddp_trainer", "shard", str(tree), str(work / "s1")]),
                       ("shard, 2 workers", [PY, "-m", "ddp_trainer", "shard", str(tree), str(work / "s2"),
                                             "--workers", "2", "--shard-size", str(64 << 20)])]:
        for p in (work / "t.tar", work / "s1", work / "s2"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
        out[label] = size / 1e6 / (time.perf_counter() - t)
    from ddp_trainer.data.shard_writer import shard_tree
    shutil.rmtree(work / "s3", ignore_errors=True)
    t = time.perf_counter()
    shard_tree(tree, work / "s3")
    out["shard in-process (no interpreter start)"] = size / 1e6 / (time.perf_counter() - t)
    print(f"write {size / 1e6:.0f} MB ({images} files), page cache warm, includes the process start: " + ", ".join(
        f"{k} {v:.0f} MB/s" for k, v in out.items()) + f"; shard / tar {out['shard, 1 worker'] / out['tar cf']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ddp_trainer_shards"))
    ap.add_argument("--what", default="index,read,write")
    ap.add_argument("--samples", type=int, default=1_281_167)
    ap.add_argument("--images", type=int, default=6000)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    what = args.what.split(",")
    if "index" in what:
        bench_index(work, args.samples)
    if "read" in what:
        bench_read(work, args.images)
    if "write" in what:
        bench_write(work, args.images)


if __name__ == "__main__":
    main()
