"""The tests' side of the warm launcher (tests/helpers/warm_launcher.py): which commands it may run,
and running them with ``subprocess.run``'s result.

A command qualifies when it is ``python SCRIPT.py ...``, ``python -m MODULE ...`` or ``python -m
torch.distributed.run --standalone --nproc_per_node=N [--monitor-interval=S] PROGRAM ...`` and its
environment agrees with the server's on every variable read while torch is imported (threads,
Python's own start-up variables): those are fixed in the server. Anything else (other torchrun
flags: restarts, rendezvous, signal forwarding, ``--no-python``; interpreter flags) is left to a
real process. ``DDP_TRAINER_TESTS_COLD=1`` sends every command to a real process, for comparison.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = Path(__file__).resolve().parent / "helpers" / "warm_launcher.py"
TORCHRUN_MODULE = "torch.distributed.run"
COLD_ENV = "DDP_TRAINER_TESTS_COLD"
# read while the server imports torch (OpenMP/BLAS thread pools, allocators) or by Python at start-up:
# a command that sets any of them otherwise than the server needs a real process
_STARTUP_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "GOMP_", "KMP_", "LD_", "MALLOC_", "PYTHON")
_RUNTIME_ONLY = {"PYTHONPATH", "PYTHONUNBUFFERED"}


def parse(cmd: list[str]) -> tuple[int, dict, list[str]] | None:
    """``(nproc, program, args)`` for a command the warm launcher runs, else None (0 = one process)."""
    if len(cmd) < 2 or cmd[0] != sys.executable:
        return None
    rest, nproc = list(cmd[1:]), 0
    if rest[:2] == ["-m", TORCHRUN_MODULE]:
        rest, standalone, nproc = rest[2:], False, None
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            flag, _, value = rest.pop(0).partition("=")
            if flag == "--standalone" and not value:
                standalone = True
            elif flag in ("--nproc_per_node", "--nproc-per-node") and value.isdigit():
                nproc = int(value)
            elif flag not in ("--monitor-interval", "--monitor_interval") or not value:
                return None
        if not standalone or not nproc:
            return None
    if len(rest) >= 2 and rest[0] == "-m" and rest[1] != TORCHRUN_MODULE:
        return nproc, {"kind": "module", "name": rest[1]}, rest[2:]
    if rest and rest[0].endswith(".py") and not rest[0].startswith("-"):
        return nproc, {"kind": "path", "path": rest[0]}, rest[1:]
    return None


def _startup_vars(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_STARTUP_PREFIXES) and k not in _RUNTIME_ONLY}


class WarmLauncher:
    """One server per test session, started on first use; ``run`` returns None for what it can't run."""

    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder, self.env = folder, env
        self.proc: subprocess.Popen | None = None
        self.broken = ""

    @property
    def socket_path(self) -> str:
        return str(self.folder / "warm.sock")

    def _start(self) -> None:
        log = open(self.folder / "warm-server.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(SERVER), self.socket_path], env=self.env,
                                     stdout=subprocess.PIPE, stderr=log, text=True, cwd=str(self.folder))
        line = self.proc.stdout.readline()  # "ready" once the imports are done
        if line.strip() != "ready":
            self.proc.kill()
            self.broken = (self.folder / "warm-server.log").read_text()[-2000:]
            raise RuntimeError(f"the warm launcher did not start: {self.broken}")

    def run(self, cmd: list[str], env: dict[str, str], cwd: Path, timeout: float):
        parsed = parse(cmd)
        if parsed is None or os.environ.get(COLD_ENV) or _startup_vars(env) != _startup_vars(self.env):
            return None
        if self.proc is None:
            self._start()
        nproc, program, args = parsed
        request = {"argv": args, "env": env, "cwd": str(cwd), "nproc": nproc, "program": program}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.socket_path)
            socket.send_fds(conn, [(json.dumps(request) + "\n").encode()], [out.fileno(), err.fileno()])
            reader = conn.makefile("r")
            job = json.loads(reader.readline())["pid"]
            conn.settimeout(timeout)
            try:
                line = reader.readline()
            except (socket.timeout, TimeoutError):
                _kill_tree(job)
                # shown with the failed test (pytest prints a test's captured stderr)
                print(f"warm launch timed out after {timeout} s; its stderr ends:\n{_read(err)[-4000:]}",
                      file=sys.stderr)
                raise subprocess.TimeoutExpired(cmd, timeout, _read(out), _read(err)) from None
            if not line:
                raise RuntimeError(f"the warm launcher's job {job} ended without an answer: {_read(err)[-2000:]}")
            code = json.loads(line)["returncode"]
            return subprocess.CompletedProcess(cmd, code, _read(out), _read(err))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _read(f) -> str:
    f.flush()
    f.seek(0)
    return f.read().decode("utf-8", errors="replace").replace("\r\n", "\n")


def _kill_tree(pid: int) -> None:
    from conftest import descendants

    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.2)
