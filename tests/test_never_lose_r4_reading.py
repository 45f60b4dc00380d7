"""Round 4, section I: faults found by reading the code, each shown by a test that failed before."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ddp_trainer.checkpoint.registry import LoadContext
from ddp_trainer.data.samplers import SamplerSpec, class_balanced_probabilities
from ddp_trainer.training.components import SamplerCheck
from ddp_trainer.training.state import TrainState

@pytest.fixture(autouse=True)
def _sigchld_kept():
    """torch's first loader with workers sets a SIGCHLD handler for good: put back the test's."""
    import signal

    before = signal.getsignal(signal.SIGCHLD)
    yield
    signal.signal(signal.SIGCHLD, before)


# --- I.1 class_balanced's identity is a digest of its probabilities ------------------------------

LABELS = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
CLASSES = ["a", "b", "c", "d"]


def _identity(weights):
    return SamplerSpec("class_balanced", probabilities=class_balanced_probabilities(LABELS, CLASSES, weights)).identity(2)


def test_class_balanced_identity_tells_a_swap_of_two_class_weights():
    # these two weightings draw other images, yet the old sum of rounded probabilities was equal
    swapped = _identity({"a": 1.0, "d": 1.0, "b": 2.0, "c": 3.0}), _identity({"a": 1.0, "d": 1.0, "b": 3.0, "c": 2.0})
    assert swapped[0] != swapped[1]
    assert _identity({"b": 2.0}) == _identity({"b": 2.0})  # the same weights: the same identity
    assert _identity(None) != _identity({"b": 2.0})


def _resumed(saved: dict, now: dict) -> TrainState:
    state = TrainState(epoch=3, position=40, step=7, loss_sum=1.0, loss_count=2.0)
    SamplerCheck(now, state).load({"train_order": saved}, LoadContext(checkpoint=None))
    return state


def test_a_mid_epoch_resume_with_swapped_class_weights_restarts_the_epoch(caplog):
    before = _identity({"b": 2.0, "c": 3.0})
    after = _identity({"b": 3.0, "c": 2.0})
    with caplog.at_level(logging.WARNING, logger="ddp_trainer"):
        state = _resumed(before, after)
    assert (state.position, state.loss_sum, state.loss_count) == (0, 0.0, 0.0)
    assert "epoch 3 restarts its order from the beginning" in caplog.text
    assert _resumed(after, after).position == 40  # unchanged weights: the position is continued


def test_an_old_class_balanced_identity_counts_as_unknown(caplog):
    now = _identity({"b": 2.0})
    old = {"sampler": "class_balanced", "probabilities": 1099511627776}  # what older versions wrote
    with caplog.at_level(logging.WARNING, logger="ddp_trainer"):
        state = _resumed(old, now)
    assert state.position == 0
    assert "unknown in a checkpoint written by an older version" in caplog.text


# --- I.2 a build removes only this host's dead builds' temporary files ---------------------------

def test_a_build_leaves_another_hosts_temporary_files_alone(demo_small, tmp_path):
    """A cache folder shared by two nodes: node-b's build in progress is a file named with its host and
    pid; its lock is held on node-b, so here it looks free and its pid looks dead."""
    from ddp_trainer.data import decoded_cache
    from ddp_trainer.data.folder_index import scan

    other = tmp_path / ".decoded-abc-1x3x16x16.u8.tmp-node-b.cluster-999999"
    other.write_bytes(b"\0" * 100)
    mine = tmp_path / f".decoded-abc-1x3x16x16.u8.tmp-{decoded_cache.this_host()}-999999"
    mine.write_bytes(b"\0" * 100)  # this host's build that was killed: its process is gone
    unnamed = tmp_path / ".decoded-abc-1x3x16x16.u8.tmp-x"
    unnamed.write_bytes(b"\0")  # no host and pid in the name: nobody can tell whose, kept
    path = decoded_cache.build(scan(demo_small / "val"), 16, tmp_path)
    assert path.exists()
    assert other.exists() and other.stat().st_size == 100  # node-b's build goes on
    assert unnamed.exists()
    assert not mine.exists()


# --- I.4 loader workers: an explicit start method, picklable under spawn/forkserver, signals set up ----

def _config(demo_small, tmp_path, *more):
    from ddp_trainer import config as config_mod

    return config_mod.load(None, [f"data.root={demo_small}", "data.image_size=16", "data.batch_size=4",
                                  "data.num_workers=1", "data.index_cache=false",
                                  f"data.cache_dir={tmp_path / 'cache'}", *more])


def _sigterm_own_worker(real):
    """A decoder that, inside a loader worker, first sends SIGTERM to its own process: what a signal
    sent to every process of a job (or a worker alone) does."""
    import os
    import signal

    import torch

    def decode(*args, **kwargs):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    return decode


def test_the_run_loaders_fork_explicitly_on_linux(demo_small, tmp_path):
    import multiprocessing

    from ddp_trainer.data.datasets import FolderDataset, eval_transform
    from ddp_trainer.data.folder_index import scan
    from ddp_trainer.data.loaders import make_eval_loader
    from ddp_trainer.launch.dist import Dist

    cfg = _config(demo_small, tmp_path)
    ds = FolderDataset(scan(demo_small / "val"), eval_transform(cfg.data))
    loader = make_eval_loader(ds, cfg.data, Dist.single(), Dist.single().device)
    assert "fork" in multiprocessing.get_all_start_methods()  # Linux
    assert loader.multiprocessing_context is multiprocessing.get_context("fork")  # not Python's default


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_the_run_loaders_work_under_spawn_and_forkserver(demo_small, tmp_path, method):
    """The dataset and the stop-signal worker init reach a worker that did not fork: pickled."""
    import signal

    import torch

    from ddp_trainer.data.datasets import FolderDataset, eval_transform
    from ddp_trainer.data.folder_index import scan
    from ddp_trainer.data.loaders import make_eval_loader
    from ddp_trainer.launch.dist import Dist
    from ddp_trainer.launch.signals import worker_init_ignoring

    cfg = _config(demo_small, tmp_path)
    ds = FolderDataset(scan(demo_small / "val"), eval_transform(cfg.data))
    dist = Dist.single()
    inline = [b[0] for b in make_eval_loader(ds, cfg.data, dist, dist.device, workers=0)]
    loader = make_eval_loader(ds, cfg.data, dist, dist.device, workers=1,
                              worker_init_fn=worker_init_ignoring([signal.SIGTERM, signal.SIGUSR1]))
    loader.multiprocessing_context = method
    got = [b[0] for b in loader]
    assert len(got) == len(inline) and all(torch.equal(a, b) for a, b in zip(got, inline))


def test_check_verify_works_under_spawn(demo_small, monkeypatch):
    """``check --verify``'s dataset is picklable: its loader works when workers are spawned."""
    import signal

    from ddp_trainer import check
    from ddp_trainer.data import workers
    from ddp_trainer.data.folder_index import scan

    monkeypatch.setattr(workers, "START_METHOD", "spawn")
    assert check._verify(scan(demo_small / "val"), 1, 10**8, [signal.SIGTERM]) == []


def test_the_cache_builds_workers_ignore_the_stop_signals(demo_small, tmp_path, monkeypatch):
    """The decoded cache build inside a run's data set-up: its worker is sent SIGTERM while it
    decodes, and the build goes on (the parent decides when to stop), as in the training loaders."""
    import signal

    from ddp_trainer.data import decoded_cache
    from ddp_trainer.data.datasets import scan_splits
    from ddp_trainer.data.loaders import build_run_data, sampler_spec
    from ddp_trainer.launch.dist import Dist
    from ddp_trainer.launch.signals import worker_init_ignoring

    monkeypatch.setattr(decoded_cache, "decode_rgb", _sigterm_own_worker(decoded_cache.decode_rgb))
    cfg = _config(demo_small, tmp_path, "data.cache=decoded")
    splits = scan_splits(cfg.data, demo_small)
    data = build_run_data(cfg, Dist.single(), splits, sampler_spec(cfg.data, splits.train),
                          worker_init_fn=worker_init_ignoring([signal.SIGTERM]), before_fork=lambda: None)
    data.close()
    assert len(list((tmp_path / "cache").rglob("decoded-*.u8"))) == 2


def test_check_verify_workers_ignore_the_stop_signals(demo_small, monkeypatch, capsys):
    from ddp_trainer import check, cli

    monkeypatch.setattr(check, "decode_rgb", _sigterm_own_worker(check.decode_rgb))
    code = cli.main(["check", f"data.root={demo_small}", "data.num_workers=1", "data.index_cache=false", "--verify"])
    assert code == 0, capsys.readouterr()
    assert "0 unreadable" in capsys.readouterr().out


# --- I.3 the index memory compares server times with server times; lengths are checked ----------

def _tree(root):
    for c in ("ant", "bee"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            (root / c / f"{i}.png").write_bytes(b"x")
    return root


def _server_behind(root, seconds: float) -> int:
    """Stamp every directory as a file server whose clock is ``seconds`` behind this machine's does
    for a change made just now."""
    import os
    import time

    t = time.time_ns() - int(seconds * 1e9)
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, ns=(t, t))
    return t


@pytest.fixture
def other_filesystem(tmp_path):
    """A memory folder on another filesystem than the data (/dev/shm: tmpfs), as a cache on a local
    disk for data on a file server."""
    import os
    import shutil
    import tempfile

    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's folder")
    folder = tempfile.mkdtemp(prefix="r4-reading-memory-", dir="/dev/shm")
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def test_a_file_added_during_a_scan_on_a_server_behind_is_seen(tmp_path, other_filesystem):
    import os
    import time

    from ddp_trainer.data.folder_index import scan

    root = _tree(tmp_path / "train")
    t = _server_behind(root, 3)  # the server's "now", which this machine's clock calls 3 s ago
    scan(root, None, other_filesystem)
    # a file added in the same server tick as the scan's listing leaves the mtime as it was
    (root / "bee" / "late.png").write_bytes(b"x")
    os.utime(root / "bee", ns=(t, t))
    assert "bee/late.png" in [rel for rel, _ in scan(root, None, other_filesystem).samples]
    # once a scan on this host, 2 s or more after the last, saw the same mtimes, the listing is reused
    time.sleep(2.1)
    scan(root, None, other_filesystem)
    (root / "ant" / "sneaky.png").write_bytes(b"x")  # slipped in with the mtime put back: unseen if reused
    os.utime(root / "ant", ns=(t, t))
    assert "ant/sneaky.png" not in [rel for rel, _ in scan(root, None, other_filesystem).samples]


def test_a_memory_file_with_impossible_lengths_is_rebuilt_with_a_warning(tmp_path, caplog):
    import json
    import struct

    from ddp_trainer.data.folder_index import scan
    from ddp_trainer.data.tree_memory import MAGIC

    root, memory = _tree(tmp_path / "train"), tmp_path / "memory"
    _server_behind(root, 60)
    first = scan(root, None, memory)
    (path,) = memory.iterdir()
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[len(MAGIC):len(MAGIC) + 8])
    head = json.loads(raw[len(MAGIC) + 8:len(MAGIC) + 8 + size])
    head["entries"] = 2**40  # a damaged count: reading 12 TiB would raise MemoryError
    new = json.dumps(head).encode()
    path.write_bytes(MAGIC + struct.pack("<Q", len(new)) + new + raw[len(MAGIC) + 8 + size:])
    with caplog.at_level(logging.WARNING, logger="ddp_trainer"):
        assert scan(root, None, memory) == first
    assert "is damaged" in caplog.text and "scanned in full" in caplog.text
    path.write_bytes(MAGIC + struct.pack("<Q", 2**60))  # a header length beyond the file
    assert scan(root, None, memory) == first


# --- I.5 a peer lost during DDP's one-time bucket rebuild reads as lost contact -------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.stacks  # DDP internals differ between torch versions: the second stack checks its own
def test_a_peer_lost_at_ddps_bucket_rebuild_reads_as_lost_contact(demo_small, tmp_path):
    """Two nodes (two torchrun agents, so that the survivor's agent does not stop it first); rank 1
    ends after its first optimizer step, so rank 0's next collective is the rebuild's broadcast at
    step 2's forward (the timeouts are equal: no barrier lowers them in between)."""
    import subprocess

    from conftest import ROOT, TORCHRUN, child_env

    port, marker = _free_port(), tmp_path / "exited"
    env = child_env(FAULT_EXIT_AT_STEP=f"1:1:{marker}")
    procs = [subprocess.Popen([*TORCHRUN, "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                               "--master_addr=127.0.0.1", f"--master_port={port}", str(ROOT / "launch.py"),
                               f"data.root={demo_small}", f"output_dir={tmp_path / f'run{node}'}",
                               "model.name=tiny_cnn_bn", "data.image_size=16", "data.batch_size=8",
                               "data.num_workers=0", "train.epochs=1", "dist.init_timeout_s=60", "dist.timeout_s=60"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
             for node in (0, 1)]
    try:
        out0 = procs[0].communicate(timeout=120)[0]
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert marker.exists(), out0[-3000:]
    errors = [l for l in out0.splitlines() if l.startswith("[rank 0] error:")]
    assert errors and "lost contact with another rank during training" in errors[0], out0[-3000:]
    assert "DDP's bucket rebuild" in errors[0]


def test_a_model_error_in_the_rebuild_forward_stays_the_models(small_args):
    import os

    from conftest import ROOT, launch, our_lines

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'helpers'}", "OMP_NUM_THREADS": "1"}
    res = launch(2, *small_args, "model.name=forward_bug_model:build", "data.num_workers=0", env=env, timeout=120)
    assert res.returncode != 0
    errors = [l for l in our_lines(res.stderr) if l.startswith("[rank 1] error:")]
    assert errors and "ValueError: a bug in the model at forward 2" in errors[0], res.stderr[-3000:]
    assert "lost contact" not in errors[0]


@pytest.mark.stacks  # the private DDP internals of each tested torch
def test_the_ddp_internals_the_rebuild_relies_on(tmp_path):
    """compat.rebuild_ddp_buckets reaches into DDP (``_has_rebuilt_buckets``, ``reducer._rebuild_buckets``):
    this fails loudly when a torch upgrade changes them. One gloo process."""
    import torch
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    from ddp_trainer import compat

    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)))
        assert compat.ddp_inside(ddp) is ddp and compat.ddp_inside(ddp.module) is None
        assert compat.rebuild_ddp_buckets(ddp) is False  # nothing due before the first backward
        ddp(torch.randn(3, 4)).sum().backward()
        assert compat.rebuild_ddp_buckets(ddp) is True  # due now: run, once
        assert compat.rebuild_ddp_buckets(ddp) is False
        ddp(torch.randn(3, 4)).sum().backward()  # DDP's own call in the forward has nothing left to do
    finally:
        tdist.destroy_process_group()
