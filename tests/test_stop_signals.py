"""Stop signals outside the training loop's graceful path: during start-up (waiting for peers, slow
preparation), a second SIGINT/SIGTERM, a warning (SIGUSR1) before the first step. Real processes,
real signals."""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PY, ROOT, TORCHRUN
from test_resume import env, resume_args, steps_logged, wait_for, worker_pids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _popen(cmd: list[str], **extra: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env(**extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _stderr_lines(proc: subprocess.Popen, needle: str, timeout: float = 60) -> list[str]:
    """Read stderr until a line holds ``needle``; returns the lines read so far."""
    lines: list[str] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} never printed: {''.join(lines)}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_while_waiting_for_peers_exits_at_once_naming_the_wait(demo_small: Path, tmp_path: Path, sig):
    # rank 0 of a world of 2 whose rank 1 never comes: it waits in the rendezvous (for dist.init_timeout_s)
    port = _free_port()
    proc = _popen([PY, str(ROOT / "launch.py"), *resume_args(demo_small, tmp_path / "run")],
                  RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(port))
    _stderr_lines(proc, "launch: DDP world_size=2")
    time.sleep(1.0)  # inside init_process_group, blocked in C
    t0 = time.monotonic()
    os.kill(proc.pid, sig)
    code = proc.wait(15)
    took = time.monotonic() - t0
    err = proc.stderr.read()
    assert code == 128 + sig, err
    assert took < 5, f"took {took:.1f} s to stop"
    (line,) = [l for l in err.splitlines() if "error:" in l]
    assert f"stopped by {sig.name} during start-up, while waiting for the other ranks to join the process group" in line
    assert f"127.0.0.1:{port}" in line and "nothing new to save" in line


def test_stop_signal_during_slow_preparation_exits_at_once(demo_small: Path, tmp_path: Path):
    out = tmp_path / "run"
    proc = _popen([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"),
                   *resume_args(demo_small, out), "data.cache=decoded", f"data.cache_dir={tmp_path / 'cache'}"],
                  FAULT_SLOW_CACHE="1:0.5")  # rank 1 builds its share of the cache slowly
    _stderr_lines(proc, "cache")
    time.sleep(1.0)
    ranks = worker_pids(proc.pid)
    os.kill(ranks[0], signal.SIGTERM)  # rank 0 waits in a collective for rank 1's share
    code = proc.wait(30)
    err = proc.stderr.read()
    assert code != 0
    (line,) = [l for l in err.splitlines() if "stopped by SIGTERM during start-up" in l]
    assert "while waiting for the decoded cache build" in line
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_warning_signal_before_the_first_step_stops_together_without_saving(demo_small: Path, tmp_path: Path):
    out = tmp_path / "run"
    marker = tmp_path / "marker"
    args = [*resume_args(demo_small, out), "data.cache=decoded", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = _popen([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"), *args],
                  FAULT_SLOW_CACHE="1:0.2", DDP_TRAINER_PREEMPT_MARKER=str(marker))
    _stderr_lines(proc, "cache")
    time.sleep(0.5)
    os.kill(worker_pids(proc.pid)[0], signal.SIGUSR1)  # only rank 0, during preparation
    code = proc.wait(120)
    err = proc.stderr.read()
    assert code == 0, err  # under the sbatch scripts' marker a stop exits 0: the marker says what happened
    assert "stopped by SIGUSR1 before training started (nothing new to save) (before the first step)" in err
    assert "Traceback" not in err
    saved = json.loads(marker.read_text())
    assert saved["signal"] == "SIGUSR1" and saved["saved"] is False and saved["step"] == 0
    assert Path(f"{marker}.ready").exists()  # written once every rank had joined
    assert not list((out / "checkpoints").glob("*.pt"))  # nothing trained, nothing written
    res = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"), *args],
                         env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def test_second_sigint_while_the_stop_checkpoint_is_written_exits_at_once(demo_small: Path, tmp_path: Path):
    out = tmp_path / "run"
    ck = out / "checkpoints"
    args = [*resume_args(demo_small, out), "train.log_every_steps=1", "checkpoint.every_steps=2"]
    proc = _popen([PY, str(ROOT / "launch.py"), *args], FAULT_PAUSE_IN_WRITE="60@2")
    wait_for(steps_logged(out, 3), proc=proc)
    wait_for(lambda: (ck / "last.pt").exists(), proc=proc)
    before = (ck / "last.pt").read_bytes()
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGINT)  # the same Ctrl-C twice at once (process group + forwarded): one request
    wait_for(lambda: any(ck.glob(".*.tmp-*")), timeout=60, proc=proc)  # the stop save hangs in its write
    time.sleep(2.5)
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)  # a deliberate second Ctrl-C
    code = proc.wait(10)
    assert time.monotonic() - t0 < 5
    err = proc.stderr.read()
    assert code == 130, err
    assert "second SIGINT: stopping at once without saving" in err
    assert (ck / "last.pt").read_bytes() == before  # the last checkpoint stays as it was


def test_fifo_named_like_an_image_is_a_clear_error_not_a_hang(demo_small: Path, tmp_path: Path):
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(demo_small), str(data)], check=True)
    cls = sorted((data / "train").iterdir())[0]
    fifo = cls / "x.jpg"
    os.mkfifo(fifo)
    res = subprocess.run([PY, str(ROOT / "launch.py"), *resume_args(data, tmp_path / "run")], env=env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    (line,) = [l for l in res.stderr.splitlines() if "error:" in l]
    assert str(fifo) in line and "not a regular file" in line and "FIFO" in line
