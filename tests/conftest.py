"""Shared fixtures: small generated datasets and real subprocess launches (torchrun, gloo, CPU)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from warm import WarmLauncher

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ROOT / "tests" / "helpers" / "faults"  # a sitecustomize that injects FAULT_* faults into children
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run"]


def child_env(**extra: str) -> dict[str, str]:
    """Environment for launched processes: one thread each (2 cores), no inherited launch variables;
    ``FAULT_*`` variables in ``extra`` inject faults (see tests/helpers/faults/sitecustomize.py)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GROUP_RANK", "PYTEST_CURRENT_TEST") and not k.startswith(("SLURM_", "FAULT_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(FAULTS)])
    return env


_WARM: list[WarmLauncher] = []  # the session's warm launcher, started on first use


def _warm() -> WarmLauncher:
    if not _WARM:
        _WARM.append(WarmLauncher(Path(tempfile.mkdtemp(prefix="ddp-trainer-warm-")), child_env()))
    return _WARM[0]


def pytest_sessionfinish(session):
    for w in _WARM:
        w.close()
        shutil.rmtree(w.folder, ignore_errors=True)


def run(cmd: list[str], timeout: float = 300, env: dict[str, str] | None = None,
        cwd: Path | None = None, cold: bool = False) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd)`` with captured text output. A launch of a Python program or of a
    standalone torchrun is forked from the session's warm launcher (tests/warm.py says which), unless
    ``cold``: the tests whose subject is a fresh interpreter or torchrun's own behaviour ask for that."""
    env, cwd = env or child_env(), cwd or ROOT
    if not cold:
        res = _warm().run(cmd, env, cwd, timeout)
        if res is not None:
            return res
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def launch(nproc: int, *args: str, timeout: float = 300, env: dict[str, str] | None = None,
           cold: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N launch.py ARGS`` (or plain python for nproc=0)."""
    if nproc == 0:
        cmd = [PY, str(ROOT / "launch.py"), *args]
    else:
        cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "--monitor-interval=0.2",
               str(ROOT / "launch.py"), *args]
    return run(cmd, timeout=timeout, env=env, cold=cold)


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL the agent, its ranks and their loader workers at once, when ``ready()`` is true."""
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"run ended before the kill: {proc.stderr.read()}"
        assert time.monotonic() - t0 < timeout, "condition never met"
        time.sleep(0.02)
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)
    time.sleep(0.2)  # let the kernel reap the orphans


def kept_mid_epoch(kept: Path, into: Path) -> dict:
    """The first mid-epoch state among the checkpoints a run kept (``FAULT_KEEP_CHECKPOINTS``), put
    in place as ``into/checkpoints/last.pt`` of a fresh output folder: what a kill right after that
    save leaves for the resume. Returns the state."""
    import torch

    for path in sorted(kept.iterdir()):
        state = torch.load(path, weights_only=True)
        if not state["epoch_complete"] and state["position"] > 0:
            (into / "checkpoints").mkdir(parents=True)
            shutil.copyfile(path, into / "checkpoints" / "last.pt")
            return state
    raise AssertionError(f"no mid-epoch checkpoint among {sorted(p.name for p in kept.iterdir())}")


def our_lines(text: str) -> list[str]:
    """Lines our code printed (torchrun's own warnings and summaries left out)."""
    return [l for l in text.splitlines() if l.startswith("[rank") or l.startswith("error:")]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory) -> Path:
    """The demo generator's classes, 12 train + 4 val images each, 16x16 pixels."""
    from ddp_trainer.data.demo import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo_small"), train_per_class=12, val_per_class=4, size=16)


@pytest.fixture(scope="session")
def demo_shards(demo_small: Path, tmp_path_factory) -> Path:
    """``demo_small`` as a shard set of ~20 kB shards (``ddp-trainer shard --shard-size 20000``):
    about ten shards of a dozen images per split, enough for shard windows and a cache to matter."""
    out = tmp_path_factory.mktemp("demo_shards") / "set"
    res = run([PY, "-m", "ddp_trainer", "shard", str(demo_small), str(out), "--shard-size", "20000"])
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture
def small_args(demo_small: Path, tmp_path: Path) -> list[str]:
    """Overrides for a seconds-long run on ``demo_small`` into a fresh output folder."""
    return [f"data.root={demo_small}", f"output_dir={tmp_path / 'run'}", "model.name=tiny_cnn_bn",
            "data.image_size=16", "data.batch_size=8", "data.num_workers=1", "train.epochs=2",
            "optim.lr=0.05"]


class Reference:
    """A finished uninterrupted run: its output folder (read-only by convention: copy it to change
    it), what it printed, and a copy of every checkpoint it wrote (``kept``: see kept_mid_epoch)."""

    def __init__(self, path: Path, stderr: str, kept: Path):
        self.path, self.stderr, self.kept = path, stderr, kept


# variables that change how fast a run goes or where shared demo files live, never what it trains
_REFERENCE_NEUTRAL = {"SLOW_MODEL_SLEEP", "DDP_TRAINER_CACHE"}


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """``reference_run(nproc, args, env=None) -> Reference``: each distinct run (process count, the
    overrides other than output_dir, the environment but for the neutral variables) is trained once
    per session, and every test comparing against it shares the result."""
    done: dict[tuple, Reference] = {}

    def get(nproc: int, args: list[str], env: dict[str, str] | None = None) -> Reference:
        env = env or child_env()
        args = [a for a in args if not a.startswith("output_dir=")]
        key = (nproc, tuple(args), tuple(sorted((k, v) for k, v in env.items() if k not in _REFERENCE_NEUTRAL)))
        if key not in done:
            base = tmp_path_factory.mktemp("reference")
            (base / "kept").mkdir()
            res = launch(nproc, *args, f"output_dir={base / 'run'}",
                         env={**env, "FAULT_KEEP_CHECKPOINTS": str(base / "kept")})
            assert res.returncode == 0, res.stderr
            done[key] = Reference(base / "run", res.stderr, base / "kept")
        return done[key]

    return get


CLUSTER_ENV = "DDP_TRAINER_REQUIRE_CLUSTER_TESTS"  # set by .ci/run: a skipped cluster test fails instead


@pytest.fixture(scope="session")
def require_root():
    """Cluster tests (SLURM, network namespaces) need root; CI requires them to run."""
    if os.geteuid() != 0:
        if os.environ.get(CLUSTER_ENV):
            pytest.fail(f"{CLUSTER_ENV} is set but this is not root: the cluster tests cannot run")
        pytest.skip("needs root (SLURM daemons, network namespaces)")


def pytest_terminal_summary(terminalreporter):
    counts = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            if "cluster" in getattr(rep, "keywords", {}):
                counts[outcome] = counts.get(outcome, 0) + 1
    if counts:
        terminalreporter.write_line("cluster tests (SLURM, two hosts): " +
                                    ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    per_file: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if getattr(rep, "when", None) in ("setup", "call", "teardown"):
                name = rep.nodeid.split("::")[0]
                per_file[name] = per_file.get(name, 0.0) + rep.duration
    if per_file:  # the suite has a time budget (README, Tests): the next file that costs minutes shows here
        slowest = sorted(per_file.items(), key=lambda kv: -kv[1])[:10]
        terminalreporter.write_line(f"the ten slowest files (of {len(per_file)}, {sum(per_file.values()):.0f} s "
                                    "of test time): " + ", ".join(f"{n} {t:.0f} s" for n, t in slowest))


# set by pytest per test, and by torch for the whole process the first time it needs the value (its
# inductor cache folder, a memo of its own default): neither is something a test leaves behind
_NOT_A_LEAK = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}


def _process_state() -> dict[str, object]:
    """What a run inside the test process may change for the whole process (seeds aside)."""
    import logging

    import torch
    from PIL import Image

    from ddp_trainer.data import decode

    loggers = {"root": logging.getLogger(), **{n: l for n, l in logging.root.manager.loggerDict.items()
                                               if n.startswith("ddp_trainer") and isinstance(l, logging.Logger)}}
    state: dict[str, object] = {
        "torch.deterministic_algorithms": (torch.are_deterministic_algorithms_enabled(),
                                           torch.is_deterministic_algorithms_warn_only_enabled()),
        "torch.backends.cudnn": (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                                 torch.backends.cudnn.allow_tf32),
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torch.float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch.default_dtype": torch.get_default_dtype(),
        "torch.num_threads": torch.get_num_threads(),
        "PIL.Image.MAX_IMAGE_PIXELS": Image.MAX_IMAGE_PIXELS,
        "data.decode decoder": decode.decoder(),
        "os.environ": {k: v for k, v in os.environ.items() if k not in _NOT_A_LEAK},
        "cwd": os.getcwd(),
    }
    for name, logger in loggers.items():
        ours = [h for h in logger.handlers if not type(h).__module__.startswith("_pytest")]  # pytest's come and go
        state[f"logger {name}"] = (ours, logger.level)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
        state[f"signal {sig.name}"] = signal.getsignal(sig)
    return state


def _restore(state: dict[str, object]) -> None:
    import logging

    import torch
    from PIL import Image

    from ddp_trainer.data import decode

    mode, warn_only = state["torch.deterministic_algorithms"]
    torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
     torch.backends.cudnn.allow_tf32) = state["torch.backends.cudnn"]
    torch.backends.cuda.matmul.allow_tf32 = state["torch.backends.cuda.matmul.allow_tf32"]
    torch.set_float32_matmul_precision(state["torch.float32_matmul_precision"])
    torch.set_default_dtype(state["torch.default_dtype"])
    torch.set_num_threads(state["torch.num_threads"])
    Image.MAX_IMAGE_PIXELS = state["PIL.Image.MAX_IMAGE_PIXELS"]
    decode.use(state["data.decode decoder"])
    kept = {k: v for k, v in os.environ.items() if k in _NOT_A_LEAK}
    os.environ.clear()
    os.environ.update({**state["os.environ"], **kept})
    os.chdir(state["cwd"])
    for key, value in state.items():
        if key.startswith("logger "):
            name = key.split(" ", 1)[1]
            logger = logging.getLogger() if name == "root" else logging.getLogger(name)
            logger.handlers[:] = [h for h in logger.handlers if type(h).__module__.startswith("_pytest")] + value[0]
            logger.level = value[1]
        elif key.startswith("signal "):
            signal.signal(signal.Signals[key.split(" ", 1)[1]], value)


@pytest.fixture(params=("torchcodec", "torchvision", "pil"))
def each_decoder(request):
    """The test runs once under each decoder data.decoder may pick (TorchCodec where it is installed:
    CI installs it), in this process; subprocess runs take ``data.decoder=`` + the value yielded."""
    from ddp_trainer.data import decode

    if request.param == "torchcodec":
        pytest.importorskip("torchcodec.decoders", reason="the torchcodec extra is not installed")
    before = decode.decoder()
    decode.use(request.param)
    yield request.param
    decode.use(before)


@pytest.fixture(autouse=True)
def process_state_unchanged():
    """Every test leaves the process as it found it: seeds are restored silently (tests seed), and
    anything else a test or a run in the test process changed is restored and fails the test."""
    import logging
    import random

    import torch

    before = _process_state()
    seeds = (random.getstate(), torch.random.get_rng_state())
    yield
    after = _process_state()
    random.setstate(seeds[0])
    torch.random.set_rng_state(seeds[1])
    new_loggers = [k for k in after if k not in before and after[k][0]]  # created here, with handlers
    changed = [k for k in before if before[k] != after.get(k)] + new_loggers
    if changed:
        _restore(before)
        for key in new_loggers:
            logging.getLogger(key.split(" ", 1)[1]).handlers[:] = []
        env = [k for k in set(before["os.environ"]) | set(after["os.environ"])
               if before["os.environ"].get(k) != after["os.environ"].get(k)]
        pytest.fail("the test changed process-wide state and did not restore it: "
                    + ", ".join(k if k != "os.environ" else f"os.environ ({', '.join(sorted(env))})" for k in changed))
