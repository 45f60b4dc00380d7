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
from conftest import ROOT, child_env, metrics
from test_resume import HELPERS, assert_bitwise_equal, reference  # noqa: F401 (reference: a fixture)

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
    # test_resume's model, data and seed: its uninterrupted reference run is this one's too
    return [f"data.root={data}", f"output_dir={out}", "model.name=slow_model:build", "data.image_size=16",
            "data.batch_size=8", "data.num_workers=1", "data.augment=[flip,random_resized_crop]",
            f"train.epochs={epochs}", "optim.lr=0.01", "seed=7", "train.log_every_steps=1"]


SBATCH_CPU = ["--cpus-per-task=2", "--time=10"]  # the cluster-sized #SBATCH lines, scaled to this machine


def sbatch(script: str, log: Path, args: list[str], env: dict, wait: bool = True,
           extra: list[str] = ()) -> subprocess.CompletedProcess:
    opts = ["--wait"] if wait else ["--parsable"]
    cpu = ["--cpus-per-task=1"] if script == "per_task.sbatch" else SBATCH_CPU
    nodes = ["--nodes=1"]  # the several-node script runs on the one node here
    return subprocess.run(["sbatch", *opts, *cpu, *nodes, *extra, f"--output={log}",
                           str(ROOT / "slurm" / script), *args],
                          capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)


@pytest.mark.stacks
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
        assert "(SLURM srun)" in log if script == "per_task.sbatch" else "(torchrun)" in log
        assert "SLURM_RESTART_COUNT=0" in log and "[slurm] training finished" in log
        if script == "per_task.sbatch":  # srun sets no thread count: the script does (one CPU per task here)
            assert "[slurm] OMP_NUM_THREADS=1 per task" in log and "1 CPU thread(s) per process" in log, log
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


def test_preemption_signal_checkpoints_requeues_resumes_and_matches(slurm, demo_small: Path, tmp_path: Path,
                                                                    reference: Path):
    """USR1 to the job step (``scancel --signal``) and to the batch shell (``--batch``), two jobs at
    once: each checkpoints, requeues, resumes mid-epoch and ends bitwise equal to an unbroken run
    (test_resume's: the same settings but for how often it logs and saves)."""
    ref = reference
    env = _env(tmp_path, SLOW_MODEL_SLEEP="0.4")
    routes = {"step": ["--signal=USR1"], "batch": ["--batch", "--signal=USR1"]}
    jobs = {}
    for route in routes:
        out, log = tmp_path / route, tmp_path / f"{route}.log"
        sub = sbatch("single_node.sbatch", log, train_args(demo_small, out), env, wait=False)
        assert sub.returncode == 0, sub.stderr
        jobs[route] = (sub.stdout.strip().split(";")[0], log, out)
    for route, (job, log, out) in jobs.items():
        _wait_text(log, "epoch 0 step 3:", 180)  # mid-training
        assert subprocess.run(["scancel", *routes[route], job], capture_output=True).returncode == 0
    for route, (job, log, out) in jobs.items():
        t0 = time.monotonic()
        while _job_state(job) not in FINAL or "SLURM_RESTART_COUNT=1" not in log.read_text():
            assert time.monotonic() - t0 < 240, log.read_text()
            time.sleep(1)
        text = log.read_text()
        assert _job_state(job) == "COMPLETED", f"{route}: {text}"
        assert "stopped by SIGUSR1 after saving a checkpoint" in text, f"{route}: {text}"
        assert "requeueing job" in text and "SLURM_RESTART_COUNT=1" in text
        assert ("batch shell got SIGUSR1" in text) == (route == "batch"), f"{route}: {text}"
        assert "Traceback" not in text and "srun: error" not in text, text  # a normal stop reads as one
        assert re.search(r"resume: from .*last.pt .* samples into the epoch", text), text
        assert [r["epoch"] for r in metrics(out)] == [0, 1]
        assert_bitwise_equal(out / "checkpoints" / "last.pt", ref / "checkpoints" / "last.pt")


# -- signals as SLURM delivers them (issue: cancel means cancel, late warnings, TERM/INT, start-up) ---

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY")


def _history(job: str) -> list[tuple[str, str]]:
    """(JobState, ExitCode) of each run of the job, from the job completion log (requeues included)."""
    try:
        text = Path("/var/log/slurm/jobcomp.log").read_text()
    except OSError:
        return []
    return [(m.group(1), m.group(2)) for m in
            re.finditer(rf"^JobId={job} .*? JobState=(\S+) .*? ExitCode=(\S+)", text, re.M)]


def _submit(tmp: Path, name: str, args: list[str], env: dict, extra: list[str] = ()) -> tuple[str, Path]:
    log = tmp / f"{name}.log"
    sub = sbatch("single_node.sbatch", log, args, env, wait=False, extra=[f"--job-name={name}", *extra])
    assert sub.returncode == 0, sub.stderr
    return sub.stdout.strip().split(";")[0], log


def _settled(job: str, timeout: float = 240) -> list[tuple[str, str]]:
    """Wait until the job is in a final state and stays there (no requeue follows); its history."""
    t0 = time.monotonic()
    while True:
        assert time.monotonic() - t0 < timeout, f"job {job} never settled: {_job_state(job)}"
        if _job_state(job) in FINAL:
            time.sleep(4)  # a requeue would show as PENDING / RUNNING again by now
            if _job_state(job) in FINAL:
                return _history(job)
        time.sleep(0.5)


def _scancel(*args: str) -> None:
    res = subprocess.run(["scancel", *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def _marker(out: Path) -> dict:
    return __import__("json").loads((out / "PREEMPTED").read_text())


def test_cancel_and_terminal_signals_stop_at_a_checkpoint_without_requeue(slurm, demo_small: Path, tmp_path: Path):
    """plain scancel -> CANCELLED, never requeued; TERM/INT to the batch shell (--batch), to every
    process (--full) or to the step -> the stop checkpoint is written (srun neither kills the step nor
    swallows INT), the job ends with status 3 and is not requeued. (--full --signal=TERM also reaches
    srun, which kills its step at once: SLURM's behaviour, see the README.)"""
    env = _env(tmp_path, SLOW_MODEL_SLEEP="0.4")
    routes = {"cancel": [], "term_batch": ["--batch", "--signal=TERM"], "int_batch": ["--batch", "--signal=INT"],
              "int_full": ["--full", "--signal=INT"], "term_step": ["--signal=TERM"]}
    jobs = {}
    for name in routes:
        out = tmp_path / name
        jobs[name] = (*_submit(tmp_path, name, train_args(demo_small, out), env), out)
    for name, (job, log, out) in jobs.items():
        _wait_text(log, "epoch 0 step 3:", 180)
        _scancel(*routes[name], job)
    for name, (job, log, out) in jobs.items():
        history = _settled(job)
        text = log.read_text()
        assert "SLURM_RESTART_COUNT=1" not in text and "requeueing" not in text, f"{name}: {text}"
        sig = "SIGINT" if name.startswith("int") else "SIGTERM"
        assert f"stopped by {sig} after saving a checkpoint" in text, f"{name}: {text}"
        assert _marker(out)["signal"] == sig and _marker(out)["saved"] is True
        state = __import__("torch").load(out / "checkpoints" / "last.pt", weights_only=True)
        assert not state["epoch_complete"] and state["position"] > 0, name
        assert "Traceback" not in text and "Killed" not in text, f"{name}: {text}"
        if name == "cancel":
            assert [s for s, _ in history] == ["CANCELLED"], history
        else:
            assert f"[slurm] stopped by {sig} at a checkpoint" in text and "not requeued" in text, text
            assert history == [("FAILED", "3:0")], f"{name}: {history}\n{text}"


def test_warning_after_the_last_step_and_during_start_up(slurm, demo_small: Path, tmp_path: Path):
    """A USR1 once the last epoch is done leaves a COMPLETED job (status 0); a USR1 while torchrun is
    still importing stops cleanly before the first step and requeues, and the requeued job finishes."""
    env = _env(tmp_path, SLOW_MODEL_SLEEP="0.2")
    late_job, late_log = _submit(tmp_path, "late", train_args(demo_small, tmp_path / "late"), env)
    early_out = tmp_path / "early"
    early_job, early_log = _submit(tmp_path, "early", train_args(demo_small, early_out), env)
    _wait_text(early_log, "SLURM_RESTART_COUNT=0", 120)
    time.sleep(1.0)  # torchrun has started and imports torch; no trainer handles signals yet
    assert "launch: DDP" not in early_log.read_text()
    _scancel("--batch", "--signal=USR1", early_job)
    _wait_text(late_log, "epoch 1:", 240)
    _scancel("--batch", "--signal=USR1", late_job)

    history = _settled(late_job)
    text = late_log.read_text()
    assert history == [("COMPLETED", "0:0")], f"{history}\n{text}"
    assert "batch shell got SIGUSR1" in text, text  # it arrived while the job still ran
    assert "requeueing" not in text and "Traceback" not in text and "[slurm] training finished" in text

    t0 = time.monotonic()
    while "SLURM_RESTART_COUNT=1" not in early_log.read_text():
        assert time.monotonic() - t0 < 120, early_log.read_text()
        time.sleep(0.5)
    history = _settled(early_job)
    text = early_log.read_text()
    # sent again once the trainer handled signals: it stops before or just after the first step
    assert "sending SIGUSR1 again" in text and "stopped by SIGUSR1" in text, text
    assert "requeueing job" in text and "[slurm] training finished" in text, text
    assert [s for s, _ in history][-1] == "COMPLETED", history
    assert "Traceback" not in text and "srun: error" not in text, text
    assert [r["epoch"] for r in metrics(early_out)] == [0, 1]
