"""Kill -9 at any moment, resume with one command, end bitwise equal to an uninterrupted run."""
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import PY, ROOT, TORCHRUN, child_env, descendants, kept_mid_epoch, kill_when, metrics, run

from ddp_trainer.data.samplers import epoch_order

HELPERS = ROOT / "tests" / "helpers"


def resume_args(demo_small: Path, out: Path) -> list[str]:
    return [f"data.root={demo_small}", f"output_dir={out}", "model.name=slow_model:build", "data.image_size=16",
            "data.batch_size=8", "data.num_workers=1", "data.augment=[flip,random_resized_crop]",
            "train.epochs=2", "checkpoint.every_steps=3", "optim.lr=0.01", "seed=7"]


def env(**extra: str) -> dict:
    return child_env(PYTHONPATH=f"{ROOT}{os.pathsep}{HELPERS}", **extra)


def start(nproc: int, args: list[str], **extra: str) -> subprocess.Popen:
    cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "launch.py"), *args]
    return subprocess.Popen(cmd, env=env(**extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def mid_epoch_checkpoint(ck: Path):
    def ready() -> bool:
        try:
            s = load(ck / "last.pt")
        except Exception:
            return False
        return not s["epoch_complete"] and s["position"] > 0
    return ready


def assert_bitwise_equal(a: Path, b: Path) -> None:
    ma, mb = load(a)["model"], load(b)["model"]
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k


@pytest.fixture
def reference(demo_small: Path, reference_run) -> Path:
    """The uninterrupted 2-process run every resume here (and test_slurm's) must end equal to."""
    return reference_run(2, resume_args(demo_small, Path("unused")), env(SLOW_MODEL_SLEEP="0")).path


@pytest.mark.stacks
def test_kill_mid_epoch_then_resume_is_bitwise_equal(reference: Path, demo_small: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = resume_args(demo_small, out)
    kill_when(start(2, args), mid_epoch_checkpoint(out / "checkpoints"))
    state = load(out / "checkpoints" / "last.pt")
    assert state["position"] > 0 and not state["epoch_complete"]
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 0, "torn')  # a line torn by the kill must not survive
    res = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"), *args], env=env())
    assert res.returncode == 0, res.stderr
    assert f"{state['position']} samples into the epoch" in res.stderr
    assert_bitwise_equal(out / "checkpoints" / "last.pt", reference / "checkpoints" / "last.pt")
    assert [r["epoch"] for r in metrics(out)] == [0, 1]
    # the interrupted epoch's train_loss covers the samples before the kill too (sums in the checkpoint)
    for resumed, uninterrupted in zip(metrics(out), metrics(reference)):
        assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-9, abs=0)


def test_a_version_1_file_spelled_out_key_by_key_resumes_exactly(reference: Path, demo_small: Path, tmp_path: Path):
    """The format's version-1 keys, written out here literally as the code wrote them when the format
    got its owner module: a file holding just these (no checksum, as the earliest version-1 files)
    still resumes mid-epoch and ends bitwise equal to the uninterrupted run."""
    first = tmp_path / "first"
    kill_when(start(2, resume_args(demo_small, first)), mid_epoch_checkpoint(first / "checkpoints"))
    written = load(first / "checkpoints" / "last.pt")
    v1 = {
        "format": "ddp_trainer.checkpoint", "format_version": 1, "monitor": written["monitor"],
        "class_to_idx": written["class_to_idx"], "model_name": written["model_name"], "config": written["config"],
        "world_size": written["world_size"], "torch_version": written["torch_version"],
        "model": written["model"], "optimizer": written["optimizer"], "scheduler": written["scheduler"],
        "scaler": written["scaler"], "epoch": written["epoch"], "position": written["position"],
        "epoch_complete": written["epoch_complete"], "step": written["step"], "best": written["best"],
        "best_k": written["best_k"], "train_loss_sum": written["train_loss_sum"],
        "train_loss_count": written["train_loss_count"], "train_data": written["train_data"], "rng": written["rng"],
    }
    # the writer still writes exactly these keys, and the optional ones added since (the checksum; the
    # sampler a position belongs to, whose absence means plan: this file resumes without it)
    assert set(written) == set(v1) | {"payload_sha256", "train_order"}
    assert v1["position"] > 0 and not v1["epoch_complete"]
    old = tmp_path / "v1.pt"
    torch.save(v1, old)
    out = tmp_path / "resumed"
    res = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"),
               *resume_args(demo_small, out), f"resume={old}"], env=env())
    assert res.returncode == 0, res.stderr
    assert f"resume: from {old} (ddp_trainer format), epoch 0, {v1['position']} samples into the epoch" in res.stderr
    assert_bitwise_equal(out / "checkpoints" / "last.pt", reference / "checkpoints" / "last.pt")


def test_kill_during_checkpoint_write_leaves_previous_intact(reference: Path, demo_small: Path, tmp_path: Path):
    out = tmp_path / "run"
    ck = out / "checkpoints"
    args = resume_args(demo_small, out)
    proc = start(2, args, FAULT_PAUSE_IN_WRITE="60@2")  # rank 0's second save pauses mid-write

    def writing() -> bool:
        # the second write (the first one's temporary file also shows briefly: wait for its last.pt)
        if not (ck / "last.pt").exists():
            return False
        return any(p.stat().st_size > 0 for p in ck.glob(".*.tmp-*"))

    kill_when(proc, writing)
    leftovers = list(ck.glob(".*.tmp-*"))
    assert leftovers  # the kill did land inside the write
    for p in ck.glob("*.pt"):
        load(p)  # every visible checkpoint is complete
    first = load(ck / "last.pt")
    assert first["step"] == 3 and first["position"] == 48  # the previous save, intact
    res = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"), *args], env=env())
    assert res.returncode == 0, res.stderr
    assert not list(ck.glob(".*.tmp-*"))
    assert_bitwise_equal(ck / "last.pt", reference / "checkpoints" / "last.pt")


def test_resume_two_to_one_process_sees_each_sample_once(demo_small: Path, reference_run, tmp_path: Path):
    # the subject is the position's meaning on another world size, not the kill: resume on one
    # process from the first mid-epoch state the uninterrupted 2-process run saved
    out = tmp_path / "run"
    args = resume_args(demo_small, out)
    kept = reference_run(2, args, env(SLOW_MODEL_SLEEP="0")).kept
    pos = kept_mid_epoch(kept, out)["position"]
    rec2 = tmp_path / "rec2"
    rec2.mkdir()
    res = run([PY, str(ROOT / "launch.py"), *args], env=env(FAULT_RECORD_SAMPLES=str(rec2), SLOW_MODEL_SLEEP="0"))
    assert res.returncode == 0, res.stderr
    assert f"{pos} samples into the epoch" in res.stderr

    def seen(folder: Path, epoch: int) -> list[int]:
        rows = [l.split() for f in folder.iterdir() for l in f.read_text().splitlines()]
        return [int(i) for e, i in rows if int(e) == epoch]

    order = epoch_order(120, 7, 0)
    after = seen(rec2, 0)
    assert Counter(order[:pos] + after) == Counter(range(120))  # rest of the epoch: each sample once
    assert Counter(seen(rec2, 1)) == Counter(range(120))  # and the next epoch is whole


def test_truncated_last_falls_back_to_previous(reference: Path, tmp_path: Path, demo_small: Path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    last = out / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.unlink()  # last.pt is a hard link to epoch_0001.pt: break the link before truncating
    last.write_bytes(data[: len(data) // 3])
    res = run([PY, str(ROOT / "launch.py"), *resume_args(demo_small, out), "train.epochs=3"], env=env())
    assert res.returncode == 0, res.stderr
    assert "resume: skipping last.pt" in res.stderr and "corrupt or truncated" in res.stderr
    assert "epoch_0001.pt" in res.stderr and "resume: config changed: train.epochs: 2 -> 3" in res.stderr
    assert [r["epoch"] for r in metrics(out)] == [0, 1, 2]
    assert load(out / "checkpoints" / "last.pt")["epoch"] == 2


def test_only_global_rank_0_writes(demo_small: Path, tmp_path: Path):
    out = tmp_path / "run"
    probe = run(["sh", str(HELPERS / "ro_unless_rank0.sh"), str(tmp_path / "probe"), "touch",
                 str(tmp_path / "probe" / "x")], env=child_env(RANK="1"))
    if probe.returncode != 0 and "Operation not permitted" in probe.stderr and "Read-only" not in probe.stderr:
        pytest.skip(f"needs mount namespaces (root): {probe.stderr.strip()}")
    assert probe.returncode != 0 and "Read-only" in probe.stderr  # the read-only mount does bite
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "--no-python", "sh",
           str(HELPERS / "ro_unless_rank0.sh"), str(out), PY, str(ROOT / "launch.py"),
           *resume_args(demo_small, out), "train.epochs=1"]
    res = run(cmd, env=env(SLOW_MODEL_SLEEP="0"))
    assert res.returncode == 0, res.stderr
    assert (out / "checkpoints" / "last.pt").exists() and len(metrics(out)) == 1


# -- graceful stops on signals ------------------------------------------------------------------------

def worker_pids(agent: int) -> dict[int, int]:
    """{global rank: pid} of the training processes under a torchrun agent."""
    out = {}
    for pid in descendants(agent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        env_map = dict(e.split(b"=", 1) for e in environ if b"=" in e)
        if b"launch.py" in cmdline and b"RANK" in env_map and b"LOCAL_RANK" in env_map:
            out.setdefault(int(env_map[b"RANK"]), pid)  # the rank itself, not its loader workers
    return out


def wait_for(cond, timeout: float = 120, proc=None) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc is not None:
            assert proc.poll() is None, f"run ended early: {proc.stderr.read()}"
        assert time.monotonic() - t0 < timeout, "condition never met"
        time.sleep(0.02)


def steps_logged(out: Path, k: int):
    def ready() -> bool:
        log = out / "train.log"
        return log.exists() and log.read_text().count("samples, loss=") >= k
    return ready


def test_signal_to_one_rank_stops_all_with_a_checkpoint_then_resume_is_exact(
        reference: Path, demo_small: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = [*resume_args(demo_small, out), "train.log_every_steps=1"]
    proc = start(2, args)
    wait_for(steps_logged(out, 4), proc=proc)
    os.kill(worker_pids(proc.pid)[1], signal.SIGUSR1)  # only rank 1 hears it
    assert proc.wait(60) != 0  # torchrun reports any non-zero worker as a failure
    stderr = proc.stderr.read()
    assert "stopped by SIGUSR1 after saving a checkpoint" in stderr
    marker = __import__("json").loads((out / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGUSR1"
    state = load(out / "checkpoints" / "last.pt")
    assert not state["epoch_complete"] and state["step"] == marker["step"] and state["position"] > 0
    res = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"), *args], env=env())
    assert res.returncode == 0, res.stderr
    assert not (out / "PREEMPTED").exists()
    assert_bitwise_equal(out / "checkpoints" / "last.pt", reference / "checkpoints" / "last.pt")


def test_signal_to_the_agent_only_and_a_second_signal_while_saving(reference: Path, demo_small: Path,
                                                                    tmp_path: Path):
    out = tmp_path / "run"
    ck = out / "checkpoints"
    args = [*resume_args(demo_small, out), "train.log_every_steps=1", "checkpoint.every_steps=0"]
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "--signals-to-handle=SIGTERM,SIGINT,SIGUSR1",
           str(ROOT / "launch.py"), *args]
    proc = subprocess.Popen(cmd, env=env(FAULT_PAUSE_IN_WRITE="3@1"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(steps_logged(out, 2), proc=proc)
    ranks = worker_pids(proc.pid)
    os.kill(proc.pid, signal.SIGUSR1)  # the agent forwards it to its workers
    wait_for(lambda: any(ck.glob(".*.tmp-*")), timeout=60)  # the stop save is being written...
    for pid in ranks.values():  # ... and more signals arrive meanwhile
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    proc.wait(90)
    for p in ck.glob("*.pt"):
        load(p)
    state = load(ck / "last.pt")
    assert not state["epoch_complete"] and state["position"] > 0
    assert (out / "PREEMPTED").exists()
    res = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"), *args], env=env())
    assert res.returncode == 0, res.stderr
    assert_bitwise_equal(ck / "last.pt", reference / "checkpoints" / "last.pt")


def test_max_restarts_worker_group_resumes_by_itself(reference: Path, demo_small: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = resume_args(demo_small, out)
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1", "--monitor-interval=0.2",
           str(ROOT / "launch.py"), *args]
    # plain torchrun: was "Gloo connectFullMesh failed ... Connection refused" in both tries unless
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the agent's shared store kept the dead round's addresses)
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(mid_epoch_checkpoint(out / "checkpoints"), proc=proc)
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)  # one worker dies; the agent restarts the group
    assert proc.wait(180) == 0, proc.stderr.read()
    log = (out / "train.log").read_text()
    assert "samples into the epoch" in log  # the restarted group resumed from the mid-epoch checkpoint
    assert_bitwise_equal(out / "checkpoints" / "last.pt", reference / "checkpoints" / "last.pt")


def test_a_signal_that_kills_the_plain_torchrun_agent_stops_the_workers_at_a_checkpoint(reference, demo_small,
                                                                                      tmp_path):
    out = tmp_path / "run"
    args = [*resume_args(demo_small, out), "train.log_every_steps=1", "checkpoint.every_steps=0"]
    proc = start(2, args)
    wait_for(steps_logged(out, 3), proc=proc)
    workers = list(worker_pids(proc.pid).values())
    os.kill(proc.pid, signal.SIGUSR1)  # plain torchrun does not handle SIGUSR1: the agent dies of it
    assert proc.wait(60) == -signal.SIGUSR1
    wait_for(lambda: not any(Path(f'/proc/{w}').exists() and 'Z' not in _proc_state(w) for w in workers), timeout=60)
    stderr = proc.stderr.read()
    # was: the workers were SIGKILLed by their parent-death signal: no checkpoint since the start
    assert "the torchrun agent (pid" in stderr and "is gone: stopping at the next step with a checkpoint" in stderr
    state = load(out / "checkpoints" / "last.pt")
    assert not state["epoch_complete"] and state["step"] >= 3
    assert json.loads((out / "PREEMPTED").read_text())["signal"] == "SIGTERM"
    res = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"), *args], env=env())
    assert res.returncode == 0, res.stderr
    assert_bitwise_equal(out / "checkpoints" / "last.pt", reference / "checkpoints" / "last.pt")


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
