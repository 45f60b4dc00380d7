"""Never lose a run: unreadable resumes refuse and touch nothing, damaged newest checkpoints fall back,
one run per output_dir, and workers end with their agent."""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import PY, ROOT, TORCHRUN, launch, metrics
from test_resume import env, resume_args, wait_for, worker_pids


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder but the lock (which names the last run that held it)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished(demo_small: Path, tmp_path_factory) -> Path:
    """A 2-epoch single-process run: last.pt == epoch_0001.pt, epoch_0000.pt, best.pt."""
    out = tmp_path_factory.mktemp("finished") / "run"
    res = subprocess.run([PY, str(ROOT / "launch.py"), f"data.root={demo_small}", f"output_dir={out}",
                          "model.name=tiny_cnn_bn", "data.image_size=16", "data.batch_size=8", "data.num_workers=0",
                          "train.epochs=2"], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=180)
    assert res.returncode == 0, res.stderr
    return out


def _args(demo_small: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={demo_small}", f"output_dir={out}", "model.name=tiny_cnn_bn", "data.image_size=16",
            "data.batch_size=8", "data.num_workers=0", *extra]


def test_resume_auto_refuses_when_no_checkpoint_can_be_used_and_changes_nothing(finished, demo_small, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for p in (out / "checkpoints").glob("*.pt"):
        state = torch.load(p, weights_only=True)
        state["format_version"] = 99  # written by a newer ddp_trainer
        p.unlink()  # break the hard links first
        torch.save(state, p)
    before = _snapshot(out)
    res = launch(0, *_args(demo_small, out, "train.epochs=3"), timeout=120)
    assert res.returncode == 2, res.stderr
    (err,) = [l for l in res.stderr.splitlines() if "error:" in l]
    assert "resume=auto: output_dir" in err and "none can be used" in err
    assert "last.pt: checkpoint" in err and "format version 99" in err and "epoch_0000.pt" in err
    assert "resume=none overwrite=true" in err
    assert _snapshot(out) == before  # checkpoints, metrics.jsonl, config.yaml, train.log: all untouched


@pytest.mark.parametrize("damage", ["empty", "text", "cut5000", "cut20000"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(finished, demo_small, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    last = out / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.unlink()
    (out / "checkpoints" / "epoch_0001.pt").unlink()  # so that the fallback is epoch_0000.pt:
    (out / "checkpoints" / "best.pt").unlink()  # resume=auto tries by state, and best.pt may hold epoch 1
    last.write_bytes({"empty": b"", "text": b"hello, I am not a checkpoint\n" * 10,
                      "cut5000": data[:5000], "cut20000": data[:20000]}[damage])
    res = launch(0, *_args(demo_small, out, "train.epochs=2"), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "resume: skipping last.pt" in res.stderr
    assert "from " + str(out / "checkpoints" / "epoch_0000.pt") in res.stderr
    assert [r["epoch"] for r in metrics(out)] == [0, 1]


def test_resume_path_to_a_non_checkpoint_is_a_clear_error(demo_small, tmp_path):
    jpeg = next((demo_small / "train").rglob("*.png"))
    res = launch(0, *_args(demo_small, tmp_path / "run", f"resume={jpeg}"), timeout=120)
    assert res.returncode == 2
    assert f"'{jpeg}' is not a checkpoint (not a file written by torch.save)" in res.stderr
    trusted = launch(0, *_args(demo_small, tmp_path / "run2", f"resume={jpeg}"), "--trust-checkpoint", timeout=120)
    assert trusted.returncode == 2 and "is not a checkpoint" in trusted.stderr


@pytest.mark.slow
def test_a_second_run_into_a_busy_output_dir_is_refused_naming_the_holder(demo_small, tmp_path):
    out = tmp_path / "run"
    args = resume_args(demo_small, out)
    # 30 steps x 0.5 s: the first run must outlast the second's start-up (torch import) on a loaded machine
    first = subprocess.Popen([PY, str(ROOT / "launch.py"), *args], env=env(SLOW_MODEL_SLEEP="0.5"), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: (out / "train.log").exists(), proc=first)
    second = launch(0, *args, timeout=120, env=env())
    assert second.returncode == 2, second.stderr
    (err,) = [l for l in second.stderr.splitlines() if "error:" in l]
    assert f"output_dir '{out}' is in use by another run (host " in err and f"pid {first.pid}, started " in err
    assert first.wait(180) == 0, first.stderr.read()  # the first run was not disturbed
    assert [r["epoch"] for r in metrics(out)] == [0, 1]
    # a killed holder leaves no stale lock: SIGKILL a run, and the next one resumes
    third = subprocess.Popen([PY, str(ROOT / "launch.py"), *args, "train.epochs=3"], env=env(), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(5)
    os.killpg(third.pid, signal.SIGKILL)
    third.wait()
    res = launch(0, *args, "train.epochs=3", timeout=180, env=env())
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_workers_end_when_their_torchrun_agent_is_killed(demo_small, tmp_path):
    out = tmp_path / "run"
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"), *resume_args(demo_small, out),
           "train.epochs=20"]
    agent = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    wait_for(lambda: len(worker_pids(agent.pid)) == 2 and (out / "train.log").exists())
    workers = list(worker_pids(agent.pid).values())
    os.kill(agent.pid, signal.SIGKILL)  # only the agent
    agent.wait()
    deadline = time.monotonic() + 15
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in workers if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
    assert not alive, f"workers {alive} outlived their agent"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.stacks
def test_a_stalled_peer_is_named_with_the_timeout_setting(demo_small: Path, tmp_path: Path):
    out = tmp_path / "run"
    from test_resume import steps_logged
    proc = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"),
                             *resume_args(demo_small, out), "train.log_every_steps=1", "dist.timeout_s=4"],
                            env=env(SLOW_MODEL_SLEEP="0.2"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(steps_logged(out, 3), proc=proc)
        os.kill(worker_pids(proc.pid)[1], signal.SIGSTOP)  # rank 1 stalls (a hung host, a stopped job)
        t0 = time.monotonic()
        line = ""
        while "error:" not in line:
            line = proc.stderr.readline()
            assert line and time.monotonic() - t0 < 60, "rank 0 never reported the stall"
        # was: RuntimeError: [.../gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 4000ms ...
        assert line.startswith("[rank 0] error: rank 1 did not answer within dist.timeout_s=4 s"), line
    finally:
        workers = list(worker_pids(proc.pid).values())
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in workers:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(30)


def test_a_full_disk_is_named_and_a_failed_background_write_stops_at_the_next_step(demo_small: Path, tmp_path: Path,
                                                                                   require_root):
    small = tmp_path / "small"
    small.mkdir()
    # a real filesystem that fills up: room for one checkpoint of this model (about 300 KB), not two
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=450k", "tmpfs", str(small)], check=True)
    try:
        out = small / "run"
        args = [f"data.root={demo_small}", f"output_dir={out}", "model.name=tiny_cnn", "data.image_size=16",
                "data.batch_size=8", "data.num_workers=0", "train.epochs=3", "checkpoint.every_steps=9",
                "train.log_every_steps=1"]
        res = launch(2, *args, timeout=180, env=env())
        assert res.returncode != 0
        (line,) = [l for l in res.stderr.splitlines() if "error:" in l]
        # was: RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos ..., an epoch later
        assert f"no space left on the device holding '{out / 'checkpoints'}'" in line and "needed about" in line
        steps = [int(m) for m in __import__("re").findall(r"epoch \d+ step (\d+):", res.stderr)]
        # saves: step 7 (epoch 0's end) fits; step 9 (every_steps) fails in the background, and every
        # rank stops within a step or two, not at the next save (epoch 1's end, step 14)
        assert 9 < max(steps) <= 11, res.stderr
        state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
        assert state["step"] == 7  # the one that fitted, intact
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_silent_corruption_inside_a_tensor_is_caught_by_the_checksum_and_skipped(finished, demo_small, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    last = out / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert len(state["payload_sha256"]) == 64
    moments = next(v["exp_avg"] for v in state["optimizer"]["state"].values() if v["exp_avg"].numel() >= 64)
    data = bytearray(last.read_bytes())
    at = data.find(moments.numpy().tobytes()[:256])
    assert at > 0
    data[at + 64: at + 128] = bytes(64)  # 64 zeroed bytes in an optimizer tensor: the file still loads
    last.unlink()
    last.write_bytes(bytes(data))
    torch.load(last, weights_only=True)  # unpickles without complaint...
    shown = subprocess.run([PY, "-m", "ddp_trainer", "inspect", str(last)], capture_output=True, text=True,
                           env=env(), cwd=ROOT, timeout=120)
    assert shown.returncode == 2 and "is damaged" in shown.stderr, shown.stderr
    res = launch(0, *_args(demo_small, out, "train.epochs=3"), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "resume: skipping last.pt" in res.stderr and "does not match the checksum" in res.stderr
    assert "from " + str(out / "checkpoints" / "epoch_0001.pt") in res.stderr  # ... but is not trained on
