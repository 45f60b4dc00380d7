"""A shard set in object storage, against a real S3 server (SeaweedFS, tests/s3_server.py): training
on s3:// is bitwise training on the same shards on disk; the node's cache fetches each shard once
for every rank, evicts the least recently used past its budget, cleans up after a killed fetch; a
shard changed on the server, the server going away mid-epoch and missing credentials or buckets
are one line, exit 2, with the last checkpoint as it was."""
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import PY, ROOT, child_env, launch, our_lines, run
from s3_server import S3Server, s3_server  # noqa: F401 - the session's server fixture

from ddp_trainer.data.remote_shards import FETCH_LOG, RETRY_ENV, RemoteShardStore, cache_key
from ddp_trainer.data.shard_set import ShardIndex
from ddp_trainer.errors import DataError

HELPERS = ROOT / "tests" / "helpers"


@pytest.fixture(scope="module")
def local_set(demo_shards: Path) -> Path:
    return demo_shards


@pytest.fixture(scope="module")
def remote_set(s3_server, local_set) -> str:  # noqa: F811
    return s3_server.upload(local_set, "sets/demo")


@pytest.fixture
def s3_env(s3_server, monkeypatch):  # noqa: F811
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server.env()


def train_args(root, *more: str) -> list[str]:
    return [f"data.root={root}", "model.name=tiny_cnn_bn", "data.image_size=16", "data.batch_size=8",
            "data.num_workers=1", "data.augment=[flip,random_resized_crop]", "data.sampler=shard_window",
            "data.shard_window=2", "train.epochs=2", "checkpoint.every_steps=3", "optim.lr=0.05", "seed=3", *more]


def fetches(cache: Path) -> Counter:
    """How often each shard was downloaded, from every set folder's fetch log under ``cache``."""
    return Counter(line.split()[2] for log in cache.glob(f"*/{FETCH_LOG}") for line in log.read_text().splitlines())


def errors(stderr: str) -> list[str]:
    return [l for l in our_lines(stderr) if "error:" in l]


def index_of(local_set: Path, split: str = "train") -> ShardIndex:
    from ddp_trainer.data.shard_store import LocalShardStore

    return ShardIndex.open(LocalShardStore(local_set), split)


@pytest.mark.slow
def test_two_processes_on_s3_train_bitwise_as_on_local_shards_fetching_each_shard_once(
        local_set, remote_set, s3_server, reference_run, tmp_path):  # noqa: F811
    ref = reference_run(2, train_args(local_set))
    cache = tmp_path / "cache"
    res = launch(2, *train_args(remote_set, f"data.shard_cache_dir={cache}", f"output_dir={tmp_path / 'run'}"),
                 env=child_env(**s3_server.env()))
    assert res.returncode == 0, res.stderr
    a = torch.load(ref.path / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    val = [json.loads(l) for l in (ref.path / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["val_acc"], r["val_loss"]) for r in val] == [(r["val_acc"], r["val_loss"]) for r in got]
    # both ranks, their loader workers and validation read through one cache: each shard fetched once
    names = set(index_of(local_set).shard_names) | set(index_of(local_set, "val").shard_names)
    assert fetches(cache) == Counter({n: 1 for n in names})
    assert (cache / cache_key(remote_set)).is_dir()
    # and the ranks themselves prefetched: a loader worker reads one split only, a rank's prefetch
    # thread fetches ahead for both its training and its validation loader
    train, log = set(index_of(local_set).shard_names), (cache / cache_key(remote_set) / FETCH_LOG).read_text()
    splits: dict[str, set[bool]] = {}
    for line in log.splitlines():
        splits.setdefault(line.split()[1], set()).add(line.split()[2] in train)
    assert any(both == {True, False} for both in splits.values()), log


def test_the_cache_evicts_the_least_recently_used_past_its_budget_but_not_a_fresh_one(
        local_set, remote_set, s3_env, tmp_path, caplog):
    sizes = index_of(local_set).shard_sizes
    budget = sizes[1] + sizes[2] + sizes[0] // 2
    store = RemoteShardStore(remote_set, tmp_path / "cache", budget)
    index = ShardIndex.open(store, "train")
    assert len(index.shard_names) >= 5

    def fetch(k: int) -> Path:
        return Path(store.shard_path(index.shard_names[k], index.shard_sizes[k], index.shard_sha256[k]))

    def age(path: Path, seconds: float) -> None:  # as if last opened that long ago
        t = time.time() - seconds
        os.utime(path, (t, t))

    p0, p1 = fetch(0), fetch(1)
    age(p0, 300)
    age(p1, 200)
    p2 = fetch(2)  # 0, 1, 2 do not fit: the least recently used (0) goes
    assert not p0.exists() and p1.exists() and p2.exists()
    age(p2, 100)
    assert fetch(1) == p1  # a use (a cache hit: no download) makes 1 the most recent
    p3 = fetch(3)  # now 2 is the least recently used
    assert p1.exists() and not p2.exists() and p3.exists()
    with caplog.at_level("WARNING", logger="ddp_trainer"):
        p4 = fetch(4)  # 1 and 3 were used within the grace period: kept, the cache goes over, once said
    assert p1.exists() and p3.exists() and p4.exists()
    assert any("data.shard_cache_bytes" in r.getMessage() for r in caplog.records)
    log = fetches(tmp_path / "cache")
    assert log == Counter({index.shard_names[k]: 1 for k in range(5)})  # the hit on 1 fetched nothing
    assert p4.read_bytes() == (local_set / index.shard_names[4]).read_bytes()


KILLED_FETCH = """
import sys, time
import s3fs.core
from ddp_trainer.data import remote_shards
from ddp_trainer.data.shard_set import ShardIndex

remote_shards.CHUNK = 4096  # several ranged reads per shard: the third one never ends
calls = []
real = s3fs.core.S3File._fetch_range
def stalled(self, start, end):
    calls.append(start)
    if len(calls) >= 3:
        time.sleep(600)
    return real(self, start, end)
s3fs.core.S3File._fetch_range = stalled
store = remote_shards.RemoteShardStore(sys.argv[1], sys.argv[2])
index = ShardIndex.open(store, "train")
store.shard_path(index.shard_names[0], index.shard_sizes[0], index.shard_sha256[0])
"""


def test_a_killed_fetch_leaves_nothing_that_stays(local_set, remote_set, s3_env, tmp_path):
    script = tmp_path / "killed_fetch.py"
    script.write_text(KILLED_FETCH)
    cache = tmp_path / "cache"
    child = subprocess.Popen([PY, str(script), remote_set, str(cache)], env=child_env(**s3_env),
                             stderr=subprocess.PIPE, text=True)
    folder = cache / cache_key(remote_set)
    t0 = time.monotonic()
    while not list(folder.glob("*.part-*")):
        assert child.poll() is None, child.stderr.read()
        assert time.monotonic() - t0 < 60, "the fetch never started"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    child.stderr.close()
    (part,) = folder.glob("*.part-*")
    assert part.name.endswith(f".part-{child.pid}")
    store = RemoteShardStore(remote_set, cache)
    index = ShardIndex.open(store, "train")
    # the dead fetch held the shard's lock: the kernel released it, so another shard's fetch sweeps
    # the temporary file away, and the shard itself is then fetched whole
    store.shard_path(index.shard_names[1], index.shard_sizes[1], index.shard_sha256[1])
    assert not part.exists()
    path = store.shard_path(index.shard_names[0], index.shard_sizes[0], index.shard_sha256[0])
    assert Path(path).read_bytes() == (local_set / index.shard_names[0]).read_bytes()
    assert not list(folder.glob("*.part-*"))
    assert index.read(0) == index_of(local_set).read(0)


def test_a_shard_changed_on_the_server_is_one_line_and_the_checkpoint_stays(s3_server, local_set, tmp_path):  # noqa: F811
    url = s3_server.upload(local_set, "sets/changed")
    cache, out = tmp_path / "cache", tmp_path / "run"
    args = [f"data.root={url}", "model.name=tiny_cnn_bn", "data.image_size=16", "data.batch_size=8",
            "data.num_workers=0", f"data.shard_cache_dir={cache}", f"output_dir={out}"]
    env = child_env(**s3_server.env())
    first = launch(0, *args, "train.epochs=1", env=env)
    assert first.returncode == 0, first.stderr
    last = out / "checkpoints" / "last.pt"
    before = last.read_bytes()
    # one byte of a training shard changed on the server (the same size), the node's cache cleared
    index = index_of(local_set)
    name = index.shard_names[1]
    data = bytearray((local_set / name).read_bytes())
    data[int(index.table.offset[int(index.shard_ids.tolist().index(1))]) + 10] ^= 0xFF
    s3_server.fs().pipe(f"{url.removeprefix('s3://')}/{name}", bytes(data))
    shutil.rmtree(cache)
    res = launch(0, *args, "train.epochs=2", env=env)  # resumes into epoch 1
    assert res.returncode == 2, res.stderr
    (err,) = errors(res.stderr)
    assert f"{url}/{name}" in err and "changed since its index was written" in err and "sha256" in err
    assert "Traceback" not in res.stderr
    assert last.read_bytes() == before
    assert not list(cache.glob("*/*.part-*")) and not list(cache.glob(f"*/{name}*"))


@pytest.mark.slow
def test_the_server_going_away_mid_epoch_is_one_line_after_bounded_retries(local_set, tmp_path):
    server = S3Server(tmp_path / "s3").start()
    try:
        url = server.upload(local_set, "sets/away")
        cache, out = tmp_path / "cache", tmp_path / "run"
        env = child_env(**server.env(), **{RETRY_ENV: "2", "SLOW_MODEL_SLEEP": "0.25"},
                        PYTHONPATH=f"{ROOT}{os.pathsep}{HELPERS}")
        cmd = [PY, str(ROOT / "launch.py"), f"data.root={url}", "model.name=slow_model:build", "data.image_size=16",
               "data.batch_size=8", "data.num_workers=0", "train.epochs=1", "data.sampler=shard_window",
               "data.shard_window=1", "checkpoint.every_steps=1", f"data.shard_cache_dir={cache}",
               f"output_dir={out}"]
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        last = out / "checkpoints" / "last.pt"
        t0 = time.monotonic()
        while not last.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() - t0 < 120, "no checkpoint"
            time.sleep(0.02)
        server.stop()
        for shard in cache.glob("*/*.tar.*"):  # a shard not opened yet must be fetched again
            shard.unlink()
        t1 = time.monotonic()
        stderr = proc.communicate(timeout=120)[1]
        assert proc.returncode == 2, stderr
        assert time.monotonic() - t1 < 30  # bounded: the 2 s budget, not botocore's own minutes
    finally:
        server.stop()
    (err,) = errors(stderr)
    assert "cannot read 's3://" in err and "after" in err and "tries" in err and "resumes" in err, err
    assert "Traceback" not in stderr
    state = torch.load(last, weights_only=True)
    assert state["position"] > 0 and not state["epoch_complete"]  # the last mid-epoch checkpoint, whole


def test_missing_bucket_and_missing_credentials_are_one_line(remote_set, s3_server, s3_env, monkeypatch,
                                                             tmp_path):  # noqa: F811
    res = run([PY, "-m", "ddp_trainer", "check", "data.root=s3://no-such-bucket/set",
               f"data.shard_cache_dir={tmp_path / 'c'}"], env=child_env(**s3_server.env()))
    assert res.returncode == 2, res.stderr
    (err,) = errors(res.stderr)
    assert "s3://no-such-bucket/set/train.index.json" in err and "does not exist" in err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(DataError, match=r"train.index.json' cannot be read: no access .*AWS_ACCESS_KEY_ID"):
        ShardIndex.open(RemoteShardStore(remote_set, tmp_path / "c"), "train")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(DataError, match=r"cannot be read: no access \(NoCredentialsError"):
        ShardIndex.open(RemoteShardStore(remote_set, tmp_path / "c"), "train")


def test_a_missing_client_package_names_its_extra(tmp_path):
    pytest.importorskip("s3fs")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed here")
    except ImportError:
        pass
    with pytest.raises(DataError, match=r'gs://b/set needs object storage support.*pip install -e "\.\[gcs\]"'):
        RemoteShardStore("gs://b/set", tmp_path)


def test_the_store_pickles_as_its_url_and_cache(local_set, remote_set, s3_env, tmp_path):
    import pickle

    store = RemoteShardStore(remote_set, tmp_path / "c", 12345)
    store.read_small("train.index.json")  # a live client is not part of the pickle
    copy = pickle.loads(pickle.dumps(store))
    assert (copy.url, copy.folder, copy.cache_bytes) == (store.url, store.folder, 12345)
    assert copy.read_small("train.index.json") == (local_set / "train.index.json").read_bytes()


def test_a_set_over_plain_http_reads_as_on_disk(local_set, tmp_path):
    pytest.importorskip("aiohttp")
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(local_set.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:  # fsspec's HTTP filesystem is the same for http:// and https://; this server speaks the first
        store = RemoteShardStore(f"http://127.0.0.1:{server.server_address[1]}/{local_set.name}", tmp_path / "c")
        index, near = ShardIndex.open(store, "train"), index_of(local_set)
        assert [index.read(i) for i in range(len(index))] == [near.read(i) for i in range(len(near))]
        from ddp_trainer.data.shard_set import has_split
        assert has_split(store, "val") and not has_split(store, "test")
        assert fetches(tmp_path / "c") == Counter({n: 1 for n in near.shard_names})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# -- prefetch: the next window of shards fetched while this one is read --------------------------

class _FakeStore:
    """A store that can prefetch, recording what it was asked (or failing when ``fail`` is set)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[str] = []
        self.fail = fail

    def prefetch(self, name, size, sha256):
        self.calls.append(name)
        if self.fail:
            raise OSError("the server went away")


class _FakeIndex:
    def __init__(self, sizes, store) -> None:
        import numpy as np

        self.shard_ids = np.repeat(np.arange(len(sizes)), sizes)
        self.shard_names = [f"s{k}" for k in range(len(sizes))]
        self.shard_sizes = [1] * len(sizes)
        self.shard_sha256 = ["0" * 64] * len(sizes)
        self.store = store


def _window_plan(shards, window: int, world: int = 1, rank: int = 0, start: int = 0):
    from ddp_trainer.data.samplers import EpochPlan, PlanBatchSampler, SamplerSpec

    spec = SamplerSpec("shard_window", shards=torch.tensor(list(shards), dtype=torch.int64), window=window)
    batches = PlanBatchSampler()
    batches.set_plan(EpochPlan(len(shards), world=world, rank=rank, batch_size=4, accum=1, seed=5, epoch=1,
                               start=start, sampler=spec))
    return batches


@pytest.mark.parametrize("world,rank,start", [(1, 0, 0), (2, 1, 0), (2, 0, 24)])
def test_prefetch_yields_the_same_items_and_stays_one_window_ahead(world, rank, start):
    from ddp_trainer.data.shard_prefetch import PrefetchingSampler

    sizes, window = [7, 5, 6, 8, 7, 7, 3, 9, 6, 6, 4, 8, 5, 7], 2
    store = _FakeStore()
    index = _FakeIndex(sizes, store)
    batches = _window_plan(index.shard_ids, window, world, rank, start)
    wrapped = PrefetchingSampler(batches, index, window)
    assert len(wrapped) == len(batches)
    expected = list(batches)
    sequence: list[int] = []  # S: this rank's shards in the order of their first sample
    for batch in expected:
        for key in batch:
            if int(index.shard_ids[key.index]) not in sequence:
                sequence.append(int(index.shard_ids[key.index]))
    got, reached = [], -1
    for batch in wrapped:
        got.append(batch)
        reached = max([reached] + [sequence.index(int(index.shard_ids[key.index])) for key in batch])
        # only what was queued can have been fetched: never past the next window
        assert set(store.calls) <= {f"s{k}" for k in sequence[:reached + window + 1]}
    assert got == expected  # the same micro-batches, the same keys, in the same order
    # the pass ended, and with it the thread: it fetched every shard the first batch did not read
    # already, in the order they are read, once each
    first = {int(index.shard_ids[key.index]) for key in expected[0]}
    assert store.calls == [f"s{k}" for k in sequence if k not in first]


def test_a_failed_prefetch_changes_nothing_and_is_logged_at_debug(caplog):
    from ddp_trainer.data.shard_prefetch import PrefetchingSampler

    store = _FakeStore(fail=True)
    index = _FakeIndex([6, 6, 6, 6, 6], store)
    batches = _window_plan(index.shard_ids, 2)
    with caplog.at_level("DEBUG", logger="ddp_trainer"):
        got = list(PrefetchingSampler(batches, index, 2))
    assert got == list(batches)
    assert len(store.calls) == 1  # the first failure ends the pass's prefetching
    assert [r.levelname for r in caplog.records if "prefetch" in r.getMessage()] == ["DEBUG"]


def test_prefetch_is_only_for_a_remote_shard_set(local_set, remote_set, s3_env, tmp_path):
    from ddp_trainer.data.datasets import FolderDataset, eval_transform
    from ddp_trainer.config import DataConfig
    from ddp_trainer.data.shard_prefetch import PrefetchingSampler, prefetching

    sampler = [0, 1, 2]
    transform = eval_transform(DataConfig())
    assert prefetching(sampler, FolderDataset(index_of(local_set), transform), 4) is sampler
    remote = FolderDataset(ShardIndex.open(RemoteShardStore(remote_set, tmp_path / "c"), "train"), transform)
    assert isinstance(prefetching(sampler, remote, 4), PrefetchingSampler)


class _TimedReads(torch.utils.data.Dataset):
    """Each sample's bytes and when its read began; a little slow, as decoding is."""

    def __init__(self, index) -> None:
        self.index, self.cached = index, None

    def __len__(self):
        return len(self.index)

    def __getitem__(self, key):
        t = time.time()
        data = self.index.read(key.index)
        time.sleep(0.004)
        return key.index, t, data


def test_prefetch_fetches_the_next_window_in_the_training_process_before_a_worker_reads_it(
        local_set, remote_set, s3_env, tmp_path):
    from torch.utils.data import DataLoader

    from ddp_trainer.data.shard_prefetch import prefetching

    cache = tmp_path / "cache"
    index = ShardIndex.open(RemoteShardStore(remote_set, cache, open_shards=4), "train")
    window = 2
    batches = _window_plan(index.shard_ids, window)
    dataset = _TimedReads(index)
    loader = DataLoader(dataset, batch_sampler=prefetching(batches, dataset, window), num_workers=1,
                        collate_fn=list, multiprocessing_context="fork")
    sigchld = signal.getsignal(signal.SIGCHLD)  # torch's first loader with workers sets a handler for good
    try:
        items = [item for batch in loader for item in batch]
    finally:
        signal.signal(signal.SIGCHLD, sigchld)
    near = index_of(local_set)
    assert [i for i, _, _ in items] == [k.index for b in batches for k in b]  # the order as without prefetch
    assert all(data == near.read(i) for i, _, data in items)  # and the bytes
    first_read: dict[str, float] = {}
    sequence: list[str] = []
    for i, t, _ in items:
        name = index.shard_names[int(index.shard_ids[i])]
        if name not in first_read:
            first_read[name] = t
            sequence.append(name)
    log = [line.split() for line in (cache / cache_key(remote_set) / FETCH_LOG).read_text().splitlines()]
    by = {name: (float(done), int(pid)) for done, pid, name, *_ in log}
    assert Counter(name for _, _, name, *_ in log) == Counter({n: 1 for n in sequence})  # each shard once
    # the second window on: fetched by this (the sampler's) process, done before the worker first read it
    later = sequence[window:]
    assert len(later) >= 3
    assert all(by[n][1] == os.getpid() for n in later), (by, sequence)
    assert all(by[n][0] <= first_read[n] for n in later), (by, first_read)


def test_a_lock_held_by_a_thread_at_a_fork_is_not_kept_by_the_child(tmp_path):
    """A loader worker forks while the prefetch thread holds a shard's lock: the child's copy of the
    lock file is closed at once, so the lock ends when the thread lets go, not with the worker."""
    import fcntl
    import threading

    from ddp_trainer.data.remote_shards import _flock

    path = str(tmp_path / "shard.lock")
    held, release = threading.Event(), threading.Event()

    def hold():
        with _flock(path):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(30)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (its fork hooks have run when os.fork returns) outlives the thread's hold
        os.write(ready_w, b"1")
        time.sleep(3)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        release.set()
        thread.join(30)
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if the child kept it
        finally:
            os.close(fd)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)


def test_a_remote_set_keeps_few_shards_open_per_process(local_set, remote_set, s3_env, tmp_path):
    from ddp_trainer.data import shard_set

    index = ShardIndex.open(RemoteShardStore(remote_set, tmp_path / "c", open_shards=2), "train")
    near = index_of(local_set)
    firsts = [int(index.shard_ids.tolist().index(k)) for k in range(len(index.shard_names))]
    for i in firsts + firsts[:2]:
        assert index.read(i) == near.read(i)
        assert sum(1 for key in shard_set._fds if key[1] == index.root) <= 2
    shard_set._close_beyond(shard_set.MAX_OPEN_SHARDS, index.root, 0)
