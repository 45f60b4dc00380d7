"""A two-host job: one torchrun per network namespace (own hostname, address and filesystem view),
c10d rendezvous over a veth pair. Needs root; CI requires it to run."""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, child_env, descendants, metrics
from test_resume import HELPERS

pytestmark = pytest.mark.cluster

HOSTS = {"host0": ("ddpt0", "ddptv0", "10.231.0.1"), "host1": ("ddpt1", "ddptv1", "10.231.0.2")}


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def netns(require_root):
    subprocess.run(["ip", "netns", "del", "ddpt0"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "ddpt1"], capture_output=True)
    try:
        for ns, dev, _ in HOSTS.values():
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", "ddptv0", "type", "veth", "peer", "name", "ddptv1")
        for name, (ns, dev, addr) in HOSTS.items():
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", dev, "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("127.0.0.1 localhost\n" +
                                       "".join(f"{a} {h}\n" for h, (_, _, a) in HOSTS.items()))
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.fail(f"network namespaces unavailable: {exc}")
    yield
    for ns, _, _ in HOSTS.values():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def start_host(host: str, own_dir: Path, mnt: Path, args: list[str], port: int, rdzv_id: str,
               **extra: str) -> subprocess.Popen:
    """torchrun on ``host``: its netns, its hostname, and ``own_dir`` mounted at ``mnt`` (own filesystem)."""
    ns = HOSTS[host][0]
    inner = ('hostname "$0" && mount --bind "$1" "$2" && shift 2 && exec "$@"')
    cmd = ["ip", "netns", "exec", ns, "unshare", "--uts", "--mount", "--propagation", "private",
           "sh", "-c", inner, host, str(own_dir), str(mnt),
           os.sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=host0:{port}", f"--rdzv_id={rdzv_id}",
           "--monitor-interval=0.2", str(ROOT / "launch.py"), *args]
    env = child_env(PYTHONPATH=f"{ROOT}{os.pathsep}{HELPERS}", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **extra)
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.fixture
def hosts(netns, demo_small: Path, tmp_path: Path):
    """Each host's own folder holding its own copy of the data; both seen at the same path ``mnt``."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    own = {}
    for h in HOSTS:
        own[h] = tmp_path / h
        shutil.copytree(demo_small, own[h] / "data")
    return mnt, own


def args_for(mnt: Path, epochs: int) -> list[str]:
    return [f"data.root={mnt}/data", f"output_dir={mnt}/run", "model.name=tiny_cnn_bn", "data.image_size=16",
            "data.batch_size=8", "data.num_workers=1", f"train.epochs={epochs}", "dist.timeout_s=30"]


def run_job(mnt, own, args, port, rid, timeout=240, **extra):
    procs = {h: start_host(h, own[h], mnt, args, port, rid, **extra) for h in HOSTS}
    outs = {h: p.communicate(timeout=timeout)[0] for h, p in procs.items()}
    return {h: p.returncode for h, p in procs.items()}, outs


def test_two_hosts_train_checkpoint_on_the_first_and_resume(hosts):
    mnt, own = hosts
    rcs, outs = run_job(mnt, own, args_for(mnt, 2), 29601, "twohosts-a")
    assert rcs == {"host0": 0, "host1": 0}, outs
    assert "ranks: 0 on host0 (10.231.0.1), 1 on host1 (10.231.0.2)" in outs["host0"], outs["host0"]
    assert "launch: DDP world_size=2 nodes=2 backend=gloo" in outs["host0"]
    assert (own["host0"] / "run" / "checkpoints" / "last.pt").exists()
    assert not (own["host1"] / "run" / "checkpoints").exists()  # only global rank 0 writes
    assert [r["epoch"] for r in metrics(own["host0"] / "run")] == [0, 1]
    rcs, outs = run_job(mnt, own, args_for(mnt, 3), 29602, "twohosts-b")
    assert rcs == {"host0": 0, "host1": 0}, outs
    assert "resume: from" in outs["host0"]  # read by rank 0 on host0, broadcast to host1
    assert [r["epoch"] for r in metrics(own["host0"] / "run")] == [0, 1, 2]


def test_killing_one_host_ends_the_other_promptly(hosts):
    mnt, own = hosts
    args = [*args_for(mnt, 50), "model.name=slow_model:build", "train.log_every_steps=1"]
    procs = {h: start_host(h, own[h], mnt, args, 29603, "twohosts-c", SLOW_MODEL_SLEEP="0.2") for h in HOSTS}
    log = own["host0"] / "run" / "train.log"
    t0 = time.monotonic()
    # past step 2: DDP rebuilds its buckets with a broadcast just before step 2's forward, once per run
    # (a peer lost there is tested in test_never_lose_r4_reading.py). Every later step's only
    # collective is the gradient all-reduce, the one this test kills the peer in.
    while not (log.exists() and log.read_text().count("samples, loss=") >= 2):
        assert time.monotonic() - t0 < 120 and procs["host0"].poll() is None, "training never started"
        time.sleep(0.1)
    victim = procs["host1"]
    for pid in [victim.pid, *descendants(victim.pid)]:  # a host crash: agent, worker, loader workers
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    t_kill = time.monotonic()
    out0 = procs["host0"].communicate(timeout=120)[0]
    elapsed = time.monotonic() - t_kill
    victim.communicate(timeout=30)
    assert procs["host0"].returncode != 0
    assert elapsed < 30, f"host0 took {elapsed:.1f}s to stop"
    errors = [l for l in out0.splitlines() if "error:" in l and l.startswith("[rank")]
    assert errors and "lost contact with another rank" in errors[0], out0[-3000:]
