"""Issue 28 D: train() in a thread of its own stops at its next step with a checkpoint on Ctrl-C
(the main thread's KeyboardInterrupt) or on ddp_trainer.request_stop(), and the run resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import PY, ROOT, child_env, run

HELPERS = ROOT / "tests" / "helpers"
SCRIPT = HELPERS / "train_in_thread.py"


def _env(sleep: str) -> dict[str, str]:
    return child_env(PYTHONPATH=f"{ROOT}{os.pathsep}{HELPERS}", SLOW_MODEL_SLEEP=sleep)


def _resumes(demo_small: Path, out: Path) -> dict:
    res = run([PY, str(SCRIPT), str(demo_small), str(out), "resume"], env=_env("0"))
    assert res.returncode == 0, res.stderr
    assert "resume: from" in res.stderr and "samples into the epoch" in res.stderr, res.stderr[-2000:]
    return json.loads((out / "resumed.json").read_text())


def test_ctrl_c_in_the_main_thread_stops_a_run_in_another_thread_with_a_checkpoint(demo_small, tmp_path):
    proc = subprocess.Popen([PY, str(SCRIPT), str(demo_small), str(tmp_path), "wait"], env=_env("0.3"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "train.log").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # a few steps into the first epoch
        proc.send_signal(signal.SIGINT)  # Ctrl-C: KeyboardInterrupt in the main thread's join()
        _, err = proc.communicate(timeout=60)  # it ends: the run does not train its remaining steps
    finally:
        proc.kill()
    assert "KeyboardInterrupt" in err, err[-2000:]
    assert "main thread ended with KeyboardInterrupt while ddp_trainer.train() runs in thread 'trainer'" in err, \
        err[-2000:]
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert outcome["error"] == "Preempted", outcome
    assert "stopped by SIGINT after saving a checkpoint" in outcome["message"], outcome
    assert outcome["excepthook_restored"], outcome
    assert _resumes(demo_small, tmp_path)["epochs_run"] >= 1


def test_request_stop_stops_a_run_in_another_thread_and_leaves_no_thread_behind(demo_small, tmp_path):
    res = run([PY, str(SCRIPT), str(demo_small), str(tmp_path), "request_stop"], env=_env("0.3"), cold=True)
    assert res.returncode == 0, res.stderr
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert outcome["asked"] is True and outcome["asked_after"] is False, outcome
    assert outcome["error"] == "Preempted" and "SIGINT after saving a checkpoint" in outcome["message"], outcome
    assert outcome["threads_left"] == [], outcome  # no checkpoint writer, watcher or tracker thread outlives train()
    assert outcome["excepthook_restored"], outcome
    assert _resumes(demo_small, tmp_path)["epochs_run"] >= 1
