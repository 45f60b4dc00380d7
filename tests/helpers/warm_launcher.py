"""A warm launcher for the tests: programs forked from a parent that has already imported torch,
torchvision and ddp_trainer, so a launch stops paying seconds of imports.

Started once per test session by ``tests/warm.py`` as ``python warm_launcher.py SOCKET`` with the
children's base environment. It imports the heavy modules, then serves one request per connection on
the Unix socket ``SOCKET``: a JSON line ``{"argv", "env", "cwd", "nproc", "program"}`` with two file
descriptors (the request's stdout and stderr) passed alongside. For each request it forks a *job*,
which answers ``{"pid": JOB_PID}`` at once and ``{"returncode": N}`` when the program has ended.

What a launched program sees is what a fresh interpreter started the same way would see, but for
the modules already imported: ``sys.argv``, ``sys.path`` (the program's folder, then the request's
``PYTHONPATH``, then the interpreter's own), ``os.environ``, the working directory, default signal
dispositions, stdin from /dev/null, and a normal interpreter exit (non-daemon threads joined,
``atexit`` handlers run). A ``sitecustomize`` on the request's ``PYTHONPATH`` (the fault injector)
is run again in the child, after the environment is in place.

- ``nproc == 0``: one process, like ``python PROGRAM ARGS``; the answer is its exit status
  (``-N`` when signal N ended it, as ``subprocess`` reports).
- ``nproc >= 1``: like ``torchrun --standalone --nproc_per_node=N PROGRAM ARGS``: N ranks with the
  variables torchrun sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``TORCHELASTIC_RUN_ID``, ...),
  each in a session of its own; the job hosts the rendezvous store, as torchrun's agent does
  (``TORCHELASTIC_USE_AGENT_STORE=True``). When a rank fails the others get SIGTERM,
  then SIGKILL after ``TERM_GRACE_S``; the job prints torchrun's failure lines and answers 1, as
  torchrun exits. What torchrun itself does beyond that (restarts, rendezvous, its signal
  forwarding) is not here: tests of those run the real torchrun.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys
import time
import uuid

TERM_GRACE_S = 30.0  # torchrun's wait between SIGTERM and SIGKILL for the ranks left
STORE_TIMEOUT_S = 900.0
POLL_S = 0.05


def _base_path() -> list[str]:
    """The interpreter's own entries of ``sys.path`` (no script folder, no PYTHONPATH entries)."""
    mine = {os.path.dirname(os.path.abspath(__file__)),
            *(os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)}
    return [p for p in sys.path if p and os.path.abspath(p) not in mine]


def _become(request: dict, env: dict[str, str], out_fd: int, err_fd: int, base_path: list[str]) -> dict:
    """In a forked child: take on the request's process state; returns what to run."""
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for fd in (devnull, out_fd, err_fd):
        os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(request["cwd"])
    program = request["program"]
    first = os.getcwd() if program["kind"] == "module" else os.path.dirname(os.path.abspath(program["path"]))
    extra = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [first, *extra, *base_path]
    import importlib

    importlib.invalidate_caches()  # the request may name modules written after the server started
    if any(k.startswith("FAULT_") for k in env):
        sys.modules.pop("sitecustomize", None)
        try:
            import sitecustomize  # noqa: F401  (the fault injector patches what the env asks for)
        except ImportError:
            pass
    return program


def _run_program(program: dict, args: list[str]) -> None:
    """Run as ``__main__``; SystemExit and exceptions leave through the interpreter as usual."""
    import runpy

    if program["kind"] == "module":
        sys.argv = ["-m", *args]
        runpy.run_module(program["name"], run_name="__main__", alter_sys=True)
    else:
        sys.argv = [program["path"], *args]
        runpy.run_path(program["path"], run_name="__main__")


def _status(raw: int) -> int:
    return -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)


def _fork_single(request: dict, env: dict[str, str], out_fd: int, err_fd: int, base_path):
    """``python PROGRAM``: one child in the job's session; returns its pid, or (in the child) the program."""
    pid = os.fork()
    if pid == 0:
        return _become(request, env, out_fd, err_fd, base_path)
    return pid


def _job(conn: socket.socket, request: dict, out_fd: int, err_fd: int, base_path: list[str]):
    """The job process: starts the ranks, watches them, answers the exit status. Returns the program
    to run when called in a rank (the rank's frames leave through here), else never returns."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    conn.sendall((json.dumps({"pid": os.getpid()}) + "\n").encode())
    nproc = request["nproc"]
    env = dict(request["env"])
    if nproc == 0:
        got = _fork_single(request, env, out_fd, err_fd, base_path)
        if isinstance(got, dict):
            conn.close()
            return got
        _, raw = os.waitpid(got, 0)
        _answer(conn, _status(raw))
    run_id = str(uuid.uuid4())
    pids: dict[int, int] = {}
    ports: list[int] = []  # the write ends: each rank waits for the store's port on its pipe
    for rank in range(nproc):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
                    "ROLE_NAME": "default", "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                    "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": "localhost",
                    "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
                    "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_USE_AGENT_STORE": "True",
                    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            for fd in (write_end, *ports):
                os.close(fd)
            port = os.read(read_end, 32).decode().strip()
            if not port:  # the job died before its store was up
                os._exit(1)
            os.close(read_end)
            os.setsid()
            conn.close()
            return _become(request, {**rank_env, "MASTER_PORT": port}, out_fd, err_fd, base_path)
        os.close(read_end)
        ports.append(write_end)
        pids[pid] = rank
    # the job hosts the store, as torchrun's agent does, on a port the kernel gives it: no window
    # between choosing a free port and binding it in which another run can take it. Started after
    # the forks, so that no rank inherits its thread.
    import torch.distributed as tdist  # loaded by the server already (ddp_trainer imports it)

    store = tdist.TCPStore("localhost", 0, nproc, True, timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S),
                           wait_for_workers=False)
    for fd in ports:
        os.write(fd, f"{store.port}\n".encode())
        os.close(fd)
    codes: dict[int, int] = {}
    first_failure = None
    deadline = None
    while len(codes) < nproc:
        pid, raw = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if deadline is not None and time.monotonic() > deadline:
                for p in pids:
                    if pids[p] not in codes:
                        _signal_group(p, signal.SIGKILL)
            time.sleep(POLL_S)
            continue
        if pid not in pids:
            continue
        codes[pids[pid]] = _status(raw)
        if codes[pids[pid]] != 0 and first_failure is None:
            first_failure = (pids[pid], pid, codes[pids[pid]])
            for p in pids:
                if pids[p] not in codes:
                    _signal_group(p, signal.SIGTERM)
            deadline = time.monotonic() + TERM_GRACE_S
    if first_failure is not None:
        rank, pid, code = first_failure
        program = request["program"].get("path") or request["program"].get("name")
        # the two lines of torchrun's report that tests and users read
        os.write(err_fd, (f"E warm_launcher: failed (exitcode: {code}) local_rank: {rank} (pid: {pid}) of binary: "
                          f"{sys.executable}\n{program} FAILED\nRoot Cause (first observed failure):\n"
                          f"  rank      : {rank} (local_rank: {rank})\n  exitcode  : {code} (pid: {pid})\n").encode())
    _answer(conn, 1 if first_failure is not None else 0)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _answer(conn: socket.socket, code: int) -> None:
    try:
        conn.sendall((json.dumps({"returncode": code}) + "\n").encode())
    finally:
        os._exit(0)


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds = b"", []
    while not data.endswith(b"\n"):
        chunk, got, _flags, _addr = socket.recv_fds(conn, 1 << 16, 4)
        if not chunk:
            raise EOFError("client went away")
        data += chunk
        fds += got
    return json.loads(data), fds


def serve(path: str):
    """Accept requests until the socket is closed; returns (in a forked rank only) the program to run."""
    base_path = _base_path()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # jobs are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        try:
            request, fds = _read_request(conn)
        except (EOFError, ValueError, OSError):
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            server.close()
            got = _job(conn, request, fds[0], fds[1], base_path)
            return got, request["argv"]
        conn.close()
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    # what every launch would import first; a job and its ranks inherit the loaded modules
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import ddp_trainer.cli  # noqa: F401
    import ddp_trainer.commands  # noqa: F401
    import ddp_trainer.check  # noqa: F401
    import ddp_trainer.training.run  # noqa: F401

    program, argv = serve(sys.argv[1])
    del serve
    _run_program(program, argv)
