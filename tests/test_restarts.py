"""Restarts that work right after a kill, and the run lock that a stray rm cannot take away (torchrun's
own restarts and a dying agent: tests/test_resume.py, which holds the uninterrupted reference run)."""
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import PY, ROOT, descendants, launch, metrics
from test_resume import env, resume_args, steps_logged, wait_for


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_run_lock_survives_a_stray_rm_and_a_sigkill_releases_it_at_once(demo_small, tmp_path):
    out = tmp_path / "run"
    args = [*resume_args(demo_small, out), "data.num_workers=2", "train.log_every_steps=1", "train.epochs=3"]
    first = subprocess.Popen([PY, str(ROOT / "launch.py"), *args], env=env(SLOW_MODEL_SLEEP="0.3"), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(steps_logged(out, 2), proc=first)
        # (e) a stray rm of the lock file: was: a second run got in, both ended 0, metrics rows doubled
        (out / ".lock").unlink()
        second = launch(0, *args, timeout=120, env=env())
        assert second.returncode == 2, second.stderr
        assert f"output_dir '{out}' is in use by another run (holder unknown: its .lock file" in second.stderr
        # (a) SIGKILL of the run alone: its loader workers linger (orphans) until they notice
        workers = descendants(first.pid)  # the loader workers
        assert workers
        # a checkpoint first (every 3 steps), so the restart has something to resume
        wait_for(lambda: (out / "checkpoints" / "last.pt").exists(), proc=first)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert any(_alive(w) for w in workers)  # the situation of the bug: an orphan still runs
        t0 = time.monotonic()
        # was: "output_dir ... is in use by another run (host vm, pid N ...)" for 2-3 s, pid N dead
        third = launch(0, *args, timeout=180, env=env())
        assert third.returncode == 0, third.stderr
        assert "resume: from" in third.stderr and time.monotonic() - t0 < 120
        assert [r["epoch"] for r in metrics(out)] == [0, 1, 2]
    finally:
        for pid in [first.pid, *descendants(first.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

