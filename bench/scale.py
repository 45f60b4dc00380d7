"""Start-up cost at ImageNet scale. Prints every figure, the file count and the targets; asserts nothing.

    python bench/scale.py [--root DIR] [--train-files 1281167] [--classes 1000] [--val-per-class 1]
                          [--what build,scan,broadcast,plan,cache_key,check,debug,ddp,worker_memory]

The synthetic tree (built once, then reused: a COMPLETE marker holds its figures) is ImageNet's
shape: ``train/<class>/<n>.JPEG`` over 1,000 classes, 1,281,167 files by default, each a real
16x16 JPEG (64 distinct images, so the files decode like real ones but cost little disk), and
``val/<class>/`` with ``--val-per-class`` files per class.

scan:       the folder scan of both splits (rank 0's work), one process.
broadcast:  the index sent from rank 0 to a second rank (two gloo processes, as training does).
plan:       one epoch's plan at 1,281,167 samples for rank 63 of world 64, batch 32: building it and
            walking every micro-batch of this rank; its memory.
cache_key:  the decoded cache's key (a stat of every training file), one process and two local ranks.
check:      ``ddp-trainer check`` (scan + report), one process.
debug:      ``python launch.py --debug``: import, scan, plan, 5 steps, validation, end to end.
ddp:        ``torchrun --nproc_per_node=2 launch.py``: from launch to the first optimizer step.
worker_memory: the private memory a loader worker forked from a rank adds by reading the index:
            an ImageNet-shaped index of --train-files entries (built in memory), one forked child
            reads every entry's path and label once in a scrambled order (an epoch), an idle child
            does not; the difference of their private (copied) pages, for the project's FolderIndex
            and for the same entries as a tuple of (path, label) tuples (what it held before).
cache_build: the decoded cache build of 6,000 noisy 160x120 JPEGs at 64 px, 1 process vs 2 under
            torchrun (num_workers=0, so the processes are the only parallelism): images/s, ratio.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
RUN_ARGS = ["model.name=resnet18", "data.image_size=16", "data.batch_size=32", "data.num_workers=1",
            "train.log_every_steps=1", "log.progress=off", "checkpoint.async=false"]


def _jpegs(count: int = 64) -> list[bytes]:
    import random

    from PIL import Image

    rng = random.Random(0)
    out = []
    for _ in range(count):
        img = Image.new("RGB", (16, 16), tuple(rng.randrange(256) for _ in range(3)))
        for _ in range(6):
            x, y = rng.randrange(16), rng.randrange(16)
            img.putpixel((x, y), tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def _write_class(job: tuple[str, int, int, int]) -> int:
    folder, label, first, count = job
    blobs = _jpegs()
    os.makedirs(folder, exist_ok=True)
    for i in range(first, first + count):
        with open(os.path.join(folder, f"n{label:08d}_{i}.JPEG"), "wb") as f:
            f.write(blobs[(label * 7 + i) % len(blobs)])
    return count


def build_tree(root: Path, train_files: int, classes: int, val_per_class: int) -> dict:
    marker = root / "COMPLETE"
    want = {"train_files": train_files, "classes": classes, "val_per_class": val_per_class}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return want
    t0 = time.monotonic()
    jobs = []
    base, extra = divmod(train_files, classes)
    first = 0
    for c in range(classes):
        n = base + (1 if c < extra else 0)
        jobs.append((str(root / "train" / f"n{c:08d}"), c, first, n))
        jobs.append((str(root / "val" / f"n{c:08d}"), c, 10_000_000 + c * val_per_class, val_per_class))
        first += n
    with Pool(os.cpu_count() or 2) as pool:
        written = sum(pool.imap_unordered(_write_class, jobs, chunksize=8))
    marker.write_text(json.dumps(want))
    print(f"build: wrote {written} files under {root} in {time.monotonic() - t0:.1f} s", flush=True)
    return want


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return e


def bench_scan(root: Path) -> None:
    """The scan without the index memory, then with it twice (the first writes it, in a fresh
    cache root; the second is a restart over the unchanged tree), then after one class changed."""
    from ddp_trainer.config import load
    from ddp_trainer.data.datasets import scan_splits

    os.environ["DDP_TRAINER_CACHE"] = tempfile.mkdtemp(prefix="scale-cache-")
    figures = {}
    for what, overrides in (("no memory", ["data.index_cache=false"]), ("memory, first start", []),
                            ("memory, restart", []), ("memory, one class changed", [])):
        if what == "memory, one class changed":
            victim = root / "train" / "n00000500"
            (victim / "added_for_the_bench.JPEG").write_bytes(next(victim.iterdir()).read_bytes())
        cfg = load(None, [f"data.root={root}", *overrides])
        t0 = time.monotonic()
        splits = scan_splits(cfg.data, root)
        dt = figures[what] = time.monotonic() - t0
        print(f"scan ({what}): {len(splits.train)} train + {len(splits.val)} val files in {dt:.2f} s "
              f"({(len(splits.train) + len(splits.val)) / dt:.0f} files/s)", flush=True)
        if what == "memory, one class changed":
            (victim / "added_for_the_bench.JPEG").unlink()
    print(f"scan: a restart over the unchanged tree spends {figures['memory, restart']:.2f} s in the index "
          f"(target <= 0.5 s), x{figures['no memory'] / figures['memory, restart']:.1f} faster than a scan",
          flush=True)


BROADCAST = r"""
import os, sys, time, pickle
sys.path.insert(0, os.environ["PYTHONPATH"])
import torch
from ddp_trainer.config import load
from ddp_trainer.data.datasets import scan_splits
from ddp_trainer.launch.dist import process_group
from ddp_trainer.launch.environment import resolve
from pathlib import Path
env = resolve(os.environ)
with process_group(env, "gloo", torch.device("cpu"), 600.0) as dist:
    splits = scan_splits(load(None, [f"data.root={sys.argv[1]}"]).data, Path(sys.argv[1])) if dist.is_main else None
    dist.barrier()
    t0 = time.monotonic()
    got = dist.broadcast_object(splits)
    dist.barrier()
    dt = time.monotonic() - t0
    if dist.is_main:
        size = len(pickle.dumps(splits))
        print(f"broadcast: index of {len(got.train) + len(got.val)} files ({size / 1e6:.1f} MB pickled) "
              f"from rank 0 to 2 ranks in {dt:.2f} s", flush=True)
"""


def bench_broadcast(root: Path) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(BROADCAST)
    subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f.name, str(root)],
                   env=env(), check=True, stderr=subprocess.DEVNULL)
    os.unlink(f.name)


def bench_plan(n: int = 1_281_167) -> None:
    import resource
    import tracemalloc

    from ddp_trainer.data.samplers import EpochPlan

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for epoch in range(3):
        tracemalloc.start()
        t0 = time.monotonic()
        plan = EpochPlan(n, world=64, rank=63, batch_size=32, accum=1, seed=0, epoch=epoch)
        built = time.monotonic() - t0
        keys = sum(len(mb) for mb in plan.micro_batches())
        times.append((built, time.monotonic() - t0))
        py_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    best = min(times, key=lambda t: t[1])
    print(f"plan: {n} samples, world 64, rank 63: built in {best[0] * 1000:.0f} ms, all {keys} of this rank's "
          f"samples walked in {best[1]:.2f} s per epoch (target <= 0.5 s); Python objects at peak "
          f"{py_peak / 1e6:.1f} MB + order tensor {n * 8 / 1e6:.1f} MB; RSS growth {rss:.0f} MB (target <= 50 MB)",
          flush=True)


def _timed_digests(index, share: int, shares: int):  # type: ignore[no-untyped-def]
    from ddp_trainer.data.decoded_cache import file_digests

    t0 = time.monotonic()
    return file_digests(index, share, shares), time.monotonic() - t0


def bench_cache_key(root: Path) -> None:
    from concurrent.futures import ProcessPoolExecutor

    from ddp_trainer.data.decoded_cache import cache_key, combine_key
    from ddp_trainer.data.folder_index import scan

    index = scan(root / "train")
    t0 = time.monotonic()
    one = cache_key(index, 16)
    dt = time.monotonic() - t0
    with ProcessPoolExecutor(2) as pool:  # what two local ranks do, each with its share of the chunks
        parts = list(pool.map(_timed_digests, [index, index], [0, 1], [2, 2]))
    two = combine_key(index, 16, {**parts[0][0], **parts[1][0]})
    dt2 = max(parts[0][1], parts[1][1])  # the ranks hold the index already: time the stat work only
    assert one == two
    print(f"cache_key: {len(index)} files stat-ed and hashed in {dt:.2f} s by one process, {dt2:.2f} s by two "
          f"(local ranks share it; same key)", flush=True)


def bench_check(root: Path) -> None:
    t0 = time.monotonic()
    res = subprocess.run([PY, "-m", "ddp_trainer", "check", f"data.root={root}", "model.name=resnet18"],
                         env=env(), capture_output=True, text=True)
    dt = time.monotonic() - t0
    line = next((l for l in res.stdout.splitlines() if l.startswith("  train:")), res.stderr.strip()[-200:])
    print(f"check: exit {res.returncode} in {dt:.1f} s ({line.strip()})", flush=True)


def _timed_run(cmd: list[str], marker: str, timeout: float = 600, stop_at_marker: bool = False,
               full_log: bool = False) -> tuple[float | None, float, str]:
    """Seconds from start until ``marker`` appears on stderr, total seconds, and the tail of stderr."""
    import signal

    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
                            start_new_session=True)
    seen = None
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if seen is None and marker in line:
            seen = time.monotonic() - t0
            if stop_at_marker:
                os.killpg(proc.pid, signal.SIGTERM)  # a graceful stop: torchrun forwards it to the ranks
    proc.wait(timeout)
    return seen, time.monotonic() - t0, "".join(lines if full_log else lines[-5:])


def bench_debug(root: Path, out: Path, repeats: int = 3) -> None:
    runs = []
    for _ in range(repeats):
        first, total, tail = _timed_run([PY, str(ROOT / "launch.py"), "--debug", f"data.root={root}",
                                         f"output_dir={out / 'debug'}", *RUN_ARGS], "epoch 0 step 1:")
        if first is None:
            print(tail)
            return
        runs.append((total, first))
    total, first = sorted(runs)[len(runs) // 2]
    print(f"debug: python launch.py --debug: whole run (import, scan, plan, 5 steps, validation, checkpoint) "
          f"{total:.1f} s, first optimizer step after {first:.1f} s (median of {repeats}; all: "
          f"{', '.join(f'{t:.1f}' for t, _ in runs)} s) (target <= 12 s)", flush=True)


def bench_ddp(root: Path, out: Path, repeats: int = 3) -> None:
    firsts = []
    for _ in range(repeats):
        first, _, tail = _timed_run(
            [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"),
             f"data.root={root}", f"output_dir={out / 'ddp'}", "resume=none", "overwrite=true", "train.epochs=1",
             *RUN_ARGS], "epoch 0 step 1:", timeout=900, stop_at_marker=True)
        if first is None:
            print(tail)
            return
        firsts.append(first)
    print(f"ddp: torchrun --nproc_per_node=2: first optimizer step after {sorted(firsts)[len(firsts) // 2]:.1f} s "
          f"(median of {repeats}; all: {', '.join(f'{t:.1f}' for t in firsts)} s) (target <= 30 s); each run "
          f"stopped there with SIGTERM", flush=True)


def _noise_tree(root: Path, count: int = 6000, classes: int = 10) -> Path:
    if (root / "COMPLETE").exists():
        return root
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    for c in range(classes):
        (root / "val" / f"c{c}").mkdir(parents=True, exist_ok=True)
        (root / "val" / f"c{c}" / "0.jpg").write_bytes((root / "train" / f"c{c}" / f"{c}.jpg").read_bytes())
    (root / "COMPLETE").write_text("")
    return root


def bench_cache_build(work: Path) -> None:
    import re
    import shutil

    data = _noise_tree(work / "noise")
    rates = {}
    for nproc in (1, 2, 1, 2, 1, 2):
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        launcher = [PY] if nproc == 1 else [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        os.environ["DDP_TRAINER_CACHE"] = str(cache)
        try:
            _, _, tail = _timed_run([*launcher, str(ROOT / "launch.py"), f"data.root={data}", "data.cache=decoded",
                                     "data.image_size=64", "data.num_workers=0", "model.name=tiny_cnn",
                                     f"output_dir={work / 'run'}", "resume=none", "overwrite=true", "train.epochs=1"],
                                    "epoch 0 step 1:", stop_at_marker=True, full_log=True)
        finally:
            del os.environ["DDP_TRAINER_CACHE"]
        m = re.search(r"decoded (\d+) images of \S+/train in ([\d.]+) s \((\d+) images/s", tail)
        if m is None:
            print(tail)
            continue
        rates.setdefault(nproc, []).append(int(m.group(3)))
        print(f"cache_build: {m.group(1)} images, {nproc} process(es): {m.group(2)} s, {m.group(3)} images/s", flush=True)
    if 1 in rates and 2 in rates:
        one, two = max(rates[1]), max(rates[2])
        print(f"cache_build: 2 processes / 1 = {two} / {one} images/s = {two / one:.2f}x (target >= 1.7x; best of 3 each)",
              flush=True)


def _private_kb() -> int:
    """This process's private pages (Private_Clean + Private_Dirty), in KiB."""
    total = 0
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total


def _forked_private_kb(read) -> int:  # type: ignore[no-untyped-def]
    """Private KiB of a forked child after it ran ``read()`` (None: stays idle)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what a DataLoader worker is
        os.close(r)
        if read is not None:
            read()
        os.write(w, str(_private_kb()).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        value = int(f.read())
    os.waitpid(pid, 0)
    return value


def bench_worker_memory(n: int, classes: int = 1000) -> None:
    from ddp_trainer.data.folder_index import FolderIndex

    per = max(1, n // classes)
    names = [f"n{c:08d}" for c in range(classes)]
    entries = [(f"{names[min(i // per, classes - 1)]}/{names[min(i // per, classes - 1)]}_{i}.JPEG",
                min(i // per, classes - 1)) for i in range(n)]
    step = 1_000_003  # a scrambled order without a list: k * step mod n visits every entry once (step prime, not dividing n)
    assert n % step != 0
    index = FolderIndex("/data/imagenet/train", names, entries)
    as_tuples = tuple(entries)
    del entries

    def epoch_index() -> None:
        for k in range(n):
            i = (k * step) % n
            index.path(i)
            index.label(i)

    def epoch_tuples() -> None:
        for k in range(n):
            i = (k * step) % n
            os.path.join("/data/imagenet/train", as_tuples[i][0])
            as_tuples[i][1]

    for name, read in (("FolderIndex (flat buffers)", epoch_index), ("tuple of (path, label) tuples", epoch_tuples)):
        idle = _forked_private_kb(None)
        t0 = time.monotonic()
        busy = _forked_private_kb(read)
        print(f"worker_memory: {n} entries, {name}: a forked worker holds {(busy - idle) / 1024:.1f} MB more "
              f"private memory after reading every entry once than an idle one ({time.monotonic() - t0:.1f} s; "
              f"target for the project: under 10 MB)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "ddp_trainer_scale"))
    ap.add_argument("--train-files", type=int, default=1_281_167)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--val-per-class", type=int, default=1)
    ap.add_argument("--what", default="build,scan,broadcast,plan,cache_key,check,debug,ddp,cache_build")
    args = ap.parse_args()
    import platform

    import torch

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    root = Path(args.root)
    what = set(args.what.split(","))
    if what - {"cache_build", "plan", "worker_memory"}:
        shape = build_tree(root, args.train_files, args.classes, args.val_per_class)
        print(f"tree: {shape['train_files']} train files over {shape['classes']} classes, "
              f"{shape['classes'] * shape['val_per_class']} val files, in {root}", flush=True)
    out = Path(tempfile.mkdtemp(prefix="scale-runs-"))
    for name, fn in (("scan", lambda: bench_scan(root)), ("broadcast", lambda: bench_broadcast(root)),
                     ("plan", lambda: bench_plan(args.train_files)), ("cache_key", lambda: bench_cache_key(root)),
                     ("check", lambda: bench_check(root)), ("debug", lambda: bench_debug(root, out)),
                     ("ddp", lambda: bench_ddp(root, out)), ("cache_build", lambda: bench_cache_build(out)),
                     ("worker_memory", lambda: bench_worker_memory(args.train_files, args.classes))):
        if name in what:
            fn()


if __name__ == "__main__":
    main()
