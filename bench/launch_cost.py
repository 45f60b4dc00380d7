"""What a launch costs before its first step, and what the tests' warm launcher saves. Prints every
figure and the ratios; asserts nothing.

    python bench/launch_cost.py [--repeats 5]

imports:  seconds to import torch, torch + torchvision, and everything launch.py loads before its first
          step, each in a fresh interpreter (best of --repeats).
launches: the tiny demo run (tiny_cnn_bn, 16 px, 2 epochs on 120 images) as one process and as 2
          torchrun ranks, started as real processes and through tests/helpers/warm_launcher.py (ranks
          forked from a parent that has imported torch, torchvision and ddp_trainer): min and median
          wall seconds over --repeats alternating runs, the cold / warm ratio, and whether both
          ended with the same val_loss.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from warm import WarmLauncher  # noqa: E402  (the tests' launcher, the thing measured)

from ddp_trainer.data.demo import write_demo_data  # noqa: E402


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return env


def best_import(code: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=base_env())
        times.append(time.perf_counter() - t0)
    return min(times)


def command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 0:
        return [sys.executable, str(ROOT / "launch.py"), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--monitor-interval=0.2", str(ROOT / "launch.py"), *args]


def val_loss(stderr: str) -> str:
    done = [line for line in stderr.splitlines() if "done: val_loss=" in line]
    return done[-1].split("val_loss=")[1].split()[0] if done else "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="launch-cost-"))
    try:
        print("imports (fresh interpreter, best of %d):" % a.repeats)
        for label, code in [("torch", "import torch"), ("torch + torchvision", "import torch, torchvision"),
                            ("launch.py before its first step", "import ddp_trainer.training.run")]:
            print(f"  {label:34s} {best_import(code, a.repeats):6.2f} s")
        data = write_demo_data(work / "data", train_per_class=12, val_per_class=4, size=16)
        args = [f"data.root={data}", "model.name=tiny_cnn_bn", "data.image_size=16", "data.batch_size=8",
                "data.num_workers=1", "train.epochs=2", "optim.lr=0.05"]
        warm = WarmLauncher(work, base_env())
        try:
            warm.run(command(0, [*args, f"output_dir={work / 'first'}"]), base_env(), ROOT, 300)  # start it
            print("launches (tiny demo run, wall seconds over %d alternating runs):" % a.repeats)
            for nproc in (0, 2):
                times: dict[str, list[float]] = {"cold": [], "warm": []}
                losses: dict[str, set[str]] = {"cold": set(), "warm": set()}
                for i in range(a.repeats):
                    for side in ("cold", "warm"):
                        out = work / f"{side}-{nproc}-{i}"
                        cmd = command(nproc, [*args, f"output_dir={out}"])
                        t0 = time.perf_counter()
                        if side == "cold":
                            res = subprocess.run(cmd, capture_output=True, text=True, env=base_env(), cwd=ROOT)
                        else:
                            res = warm.run(cmd, base_env(), ROOT, 300)
                        times[side].append(time.perf_counter() - t0)
                        assert res.returncode == 0, res.stderr[-2000:]
                        losses[side].add(val_loss(res.stderr))
                        shutil.rmtree(out)
                name = "one process" if nproc == 0 else f"torchrun, {nproc} ranks"
                for side in ("cold", "warm"):
                    print(f"  {name:20s} {side}: min {min(times[side]):5.2f} s, median "
                          f"{statistics.median(times[side]):5.2f} s, val_loss {sorted(losses[side])}")
                ratio = statistics.median(times["cold"]) / statistics.median(times["warm"])
                print(f"  {name:20s} cold / warm (medians): {ratio:.1f}x; same val_loss: "
                      f"{losses['cold'] == losses['warm'] and len(losses['cold']) == 1}")
        finally:
            warm.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
