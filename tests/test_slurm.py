"""The sbatch scripts on a real one-node SLURM (slurmctld + slurmd + munge on loopback).

Needs root (the cluster is started by tests/slurm/slurm-up.sh, which installs Debian's packages
when missing). Skipped with a reason otherwise; CI sets DDP_TRAINER_REQUIRE_CLUSTER_TESTS=1, which
turns such a skip into a failure.
"""
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, TORCHRUN, child_env, metrics, run
from test_resume import HELPERS, assert_bitwise_equal

pytestmark = pytest.mark.cluster


def _env(tmp: Path, **extra: str) -> dict:
    bindir = str(Path(os.sys.executable).parent)
    return child_env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", PYTHON=os.sys.executable,
                     PYTHONPATH=f"{ROOT}{os.pathsep}{HELPERS}", DDP_TRAINER_CACHE=str(tmp / "cache"),
                     NPROC_PER_NODE="2", **extra)


@pytest.fixture(scope="module")
def slurm(require_root):
    up = subprocess.run(["bash", str(ROOT / "tests/slurm/slurm-up.sh")], capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        pytest.fail(f"slurm-up.sh failed: {up.stderr[-2000:]}")
    yield
    subprocess.run(["scancel", "--user=root"], capture_output=True)


def train_args(data: Path, out: Path, epochs: int = 2) -> list[str]:
    return [f"data.root={data}", f"output_dir={out}", "model.name=slow_model:build", "data.image_size=16",
            "data.batch_size=8", "data.num_workers=1", "data.augment=[flip,random_resized_crop]",
            f"train.epochs={epochs}", "optim.lr=0.01", "seed=3", "train.log_every_steps=1"]


SBATCH_CPU = ["--cpus-per-task=2", "--time=10"]  # the cluster-sized #SBATCH lines, scaled to this machine


def sbatch(script: str, log: Path, args: list[str], env: dict, wait: bool = True,
           extra: list[str] = ()) -> subprocess.CompletedProcess:
    opts = ["--wait"] if wait else ["--parsable"]
    cpu = ["--cpus-per-task=1"] if script == "per_task.sbatch" else SBATCH_CPU
    nodes = ["--nodes=1"]  # the several-node script runs on the one node here
    return subprocess.run(["sbatch", *opts, *cpu, *nodes, *extra, f"--output={log}",
                           str(ROOT / "slurm" / script), *args],
                          capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)


def test_every_sbatch_script_runs_to_completion(slurm, demo_small: Path, tmp_path: Path):
    env = _env(tmp_path, SLOW_MODEL_SLEEP="0")
    results = {}

    def go(script):
        out = tmp_path / script
        results[script] = (sbatch(script, tmp_path / f"{script}.log", train_args(demo_small, out), env), out)

    threads = [threading.Thread(target=go, args=(s,)) for s in
               ("single_node.sbatch", "multi_node.sbatch", "per_task.sbatch")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for script, (res, out) in results.items():
        log = (tmp_path / f"{script}.log").read_text()
        assert res.returncode == 0, f"{script}: {res.stderr}\n{log}"
        assert "launch: DDP world_size=2 nodes=1 backend=gloo device=cpu" in log, log
        assert "(slurm)" in log if script == "per_task.sbatch" else "(torchrun)" in log
        assert "SLURM_RESTART_COUNT=0" in log and "step finished with status 0" in log
        assert [r["epoch"] for r in metrics(out)] == [0, 1]
    assert "rendezvous" in (tmp_path / "multi_node.sbatch.log").read_text()


def _job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else "UNKNOWN"


def _wait_text(path: Path, text: str, timeout: float) -> None:
    t0 = time.monotonic()
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() - t0 < timeout, f"{text!r} never appeared in {path}"
        time.sleep(0.1)


@pytest.mark.parametrize("route", ["step", "batch"])
def test_preemption_signal_checkpoints_requeues_resumes_and_matches(slurm, demo_small: Path, tmp_path: Path,
                                                                    route: str):
    env = _env(tmp_path, SLOW_MODEL_SLEEP="0.4")
    ref = tmp_path / "ref"
    r = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"), *train_args(demo_small, ref)],
            env=_env(tmp_path, SLOW_MODEL_SLEEP="0"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "run"
    log = tmp_path / "job.log"
    sub = sbatch("single_node.sbatch", log, train_args(demo_small, out), env, wait=False)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    _wait_text(log, "epoch 0 step 3:", 180)  # mid-training
    cmd = ["scancel", "--signal=USR1", job] if route == "step" else ["scancel", "--batch", "--signal=USR1", job]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    t0 = time.monotonic()
    while _job_state(job) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") or "SLURM_RESTART_COUNT=1" not in log.read_text():
        assert time.monotonic() - t0 < 240, log.read_text()
        time.sleep(1)
    text = log.read_text()
    assert _job_state(job) == "COMPLETED", text
    assert "stopped by SIGUSR1 after saving a checkpoint" in text
    assert "requeueing job" in text and "SLURM_RESTART_COUNT=1" in text
    if route == "batch":
        assert "batch shell got SIGUSR1" in text
    assert re.search(r"resume: from .*last.pt .* samples into the epoch", text), text
    assert [r["epoch"] for r in metrics(out)] == [0, 1]
    assert_bitwise_equal(out / "checkpoints" / "last.pt", ref / "checkpoints" / "last.pt")
