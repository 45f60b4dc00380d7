"""``ddp-trainer shard``: the format, the writer's care (atomic, resumable, parallel, the tree only
read, a full disk named) and interoperability with the real webdataset and wids packages."""
import glob
import hashlib
import json
import os
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import PY, ROOT, child_env, run

from ddp_trainer.data.folder_index import scan
from ddp_trainer.data.shard_set import ShardIndex
from ddp_trainer.data.shard_store import LocalShardStore


def shard(*argv: str):
    return run([PY, "-m", "ddp_trainer", "shard", *argv])


def tree_state(root: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_shards_hold_the_tree_in_its_order_wherever_placed_and_the_tree_is_only_read(demo_small, tmp_path):
    before = tree_state(demo_small)
    res = shard(str(demo_small), str(tmp_path / "set"), "--shard-size", "8000")
    assert res.returncode == 0, res.stderr
    assert tree_state(demo_small) == before
    for split in ("train", "val"):
        tree = scan(demo_small / split)
        index = ShardIndex.open(LocalShardStore(tmp_path / "set"), split)
        assert len(index) == len(tree) and index.classes == tree.classes
        assert [index.rel(i) for i in range(len(index))] == [tree.rel(i) for i in range(len(tree))]
        assert list(index.labels) == list(tree.labels)
        assert all(index.read(i) == tree.read(i) for i in range(len(tree)))
        assert index.fingerprint() == tree.fingerprint()
        ids = index.shard_ids.tolist()
        assert ids != sorted(ids) and len(set(ids)) > 1  # placed shuffled by default: the table not in shard order
    doc = json.loads((tmp_path / "set" / "train.index.json").read_text())
    assert doc["__kind__"] == "wids-shard-index-v1" and doc["name"] == "train"
    assert doc["ddp_trainer"]["shuffle_seed"] == 0
    for entry, sha in zip(doc["shardlist"], doc["ddp_trainer"]["sha256"]):
        data = (tmp_path / "set" / entry["url"]).read_bytes()
        assert len(data) == entry["filesize"] and hashlib.sha256(data).hexdigest() == sha
        assert entry["filesize"] <= 8000 + 3 * 512 + 1024 or entry["nsamples"] == 1
    names = os.listdir(tmp_path / "set")
    assert not [n for n in names if n.startswith(".")], names  # no temporary file or record left


@pytest.fixture(scope="module")
def placed(demo_small, tmp_path_factory) -> dict:
    """``demo_small`` (10 classes x 12 train images) as ~20 kB shards of about a dozen images, placed
    by ``--shuffle 7`` and in the tree's order (``--no-shuffle``)."""
    base = tmp_path_factory.mktemp("placed")
    sets = {"shuffled": ["--shuffle", "7"], "tree": ["--no-shuffle"]}
    for name, flags in sets.items():
        res = shard(str(demo_small), str(base / name), "--shard-size", "20000", *flags)
        assert res.returncode == 0, res.stderr
    return {name: base / name for name in sets}


def classes_per_shard(index: ShardIndex) -> list[int]:
    labels, ids = list(index.labels), index.shard_ids.tolist()
    return [len({lab for lab, k in zip(labels, ids) if k == s}) for s in range(len(index.shard_names))]


def test_shuffle_mixes_classes_in_each_shard_and_keeps_the_trees_sample_order(demo_small, placed):
    from ddp_trainer.data.shard_writer import placement

    tree = scan(demo_small / "train")
    mixed = ShardIndex.open(LocalShardStore(placed["shuffled"]), "train")
    plain = ShardIndex.open(LocalShardStore(placed["tree"]), "train")
    assert len(tree.classes) >= 4 and len(mixed.shard_names) >= 8
    assert min(classes_per_shard(mixed)) > 2
    assert max(classes_per_shard(plain)) <= 2 and plain.shard_ids.tolist() == sorted(plain.shard_ids.tolist())
    for index in (mixed, plain):  # sample i is file i of the tree, bytes, name and label
        assert [index.rel(i) for i in range(len(index))] == [tree.rel(i) for i in range(len(tree))]
        assert list(index.labels) == list(tree.labels) and index.fingerprint() == tree.fingerprint()
        assert all(index.read(i) == tree.read(i) for i in range(len(tree)))
    # the shards hold the samples in the documented permutation of the seed, a pure function of (seed, n)
    assert mixed.storage_order().tolist() == placement(7, len(tree)).tolist()
    assert sorted(placement(7, 1000).tolist()) == list(range(1000)) and placement(7, 9).tolist() != list(range(9))
    assert placement(7, 50).tolist() == placement(7, 50).tolist() != placement(8, 50).tolist()
    for name, seed in (("shuffled", 7), ("tree", None)):
        doc = json.loads((placed[name] / "val.index.json").read_text())
        assert doc["ddp_trainer"]["shuffle_seed"] == seed


def test_shard_window_batches_mix_more_classes_on_shuffled_shards(placed):
    """The sampler's order over each set, cut into batches of 8: the distinct classes of a batch."""
    import torch

    from ddp_trainer.data.samplers import shard_window_order

    mixing = {}
    for name, root in placed.items():
        index = ShardIndex.open(LocalShardStore(root), "train")
        labels = list(index.labels)
        per_batch = []
        for epoch in range(4):
            order = shard_window_order(torch.tensor(index.shard_ids.tolist()), 3, epoch, 1, 2).tolist()
            per_batch += [len({labels[i] for i in order[b:b + 8]}) for b in range(0, len(order) - 7, 8)]
        mixing[name] = sum(per_batch) / len(per_batch)
    # in the tree's order a window of 2 shards of 1 or 2 classes each: about 3 classes per batch
    assert mixing["tree"] <= 3.5 and mixing["shuffled"] >= 1.5 * mixing["tree"], mixing


def test_workers_write_the_same_bytes_as_one(demo_small, tmp_path):
    assert shard(str(demo_small), str(tmp_path / "a"), "--shard-size", "8000").returncode == 0
    res = shard(str(demo_small), str(tmp_path / "b"), "--shard-size", "8000", "--workers", "2")
    assert res.returncode == 0, res.stderr
    a, b = sorted(os.listdir(tmp_path / "a")), sorted(os.listdir(tmp_path / "b"))
    assert a == b
    for n in a:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


def test_a_killed_run_resumes_from_its_complete_shards(demo_small, tmp_path):
    out = tmp_path / "set"
    # SLOW: a real process, killed once its third shard has landed
    proc = subprocess.Popen([PY, "-m", "ddp_trainer", "shard", str(demo_small), str(out), "--shard-size", "3000"],
                            env=child_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("train-*.tar"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    landed = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("train-*.tar")}
    assert len(landed) >= 3 and not (out / "train.index.json").exists()
    # another placement into the killed run's OUT is refused in one line, before anything is written
    other = shard(str(demo_small), str(out), "--shard-size", "3000", "--shuffle", "1")
    lines = [l for l in other.stderr.splitlines() if l.strip()]
    assert other.returncode == 2 and len(lines) == 1, other.stderr
    assert "--shuffle 0" in lines[0] and "--shuffle 1" in lines[0] and ".done.json" in lines[0]
    assert all((out / n).stat().st_mtime_ns == mtime for n, (mtime, _) in landed.items())
    # resumed with other --workers: the same samples go to the same shards
    res = shard(str(demo_small), str(out), "--shard-size", "3000", "--workers", "2")
    assert res.returncode == 0, res.stderr
    kept = [n for n, (mtime, _) in landed.items() if (out / n).stat().st_mtime_ns == mtime]
    assert len(kept) >= 2  # complete shards are not written again (the last may have lacked its record)
    fresh = tmp_path / "fresh"
    assert shard(str(demo_small), str(fresh), "--shard-size", "3000", "--shuffle", "0").returncode == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh))
    for n in os.listdir(fresh):
        assert (out / n).read_bytes() == (fresh / n).read_bytes(), n
    # and a complete set is not overwritten with another placement either
    again = shard(str(demo_small), str(out), "--shard-size", "3000", "--no-shuffle")
    assert again.returncode == 2 and "train.index.json" in again.stderr and "tree's order" in again.stderr
    assert len([l for l in again.stderr.splitlines() if l.strip()]) == 1, again.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_one_line_naming_the_space_needed(demo_small, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        res = shard(str(demo_small), str(mnt / "set"))
        assert res.returncode == 2
        lines = [l for l in res.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and "GB free" in lines[0] and "need" in lines[0], res.stderr
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_webdataset_reads_every_sample_with_its_cls(demo_small, tmp_path):
    wds = pytest.importorskip("webdataset")
    assert shard(str(demo_small), str(tmp_path / "set"), "--shard-size", "8000").returncode == 0
    tree = scan(demo_small / "train")
    index = ShardIndex.open(LocalShardStore(tmp_path / "set"), "train")
    urls = sorted(glob.glob(str(tmp_path / "set" / "train-*.tar")))
    got = [(s["__key__"], int(s["cls"]), s["png"]) for s in wds.WebDataset(urls, shardshuffle=False)]
    # in the shards' order (shuffled placement): every tree sample once, with its class
    placed = index.storage_order().tolist()
    assert sorted(placed) == list(range(len(tree))) and placed != sorted(placed)
    assert [(label, b) for _, label, b in got] == [(tree.label(i), tree.read(i)) for i in placed]
    assert [key for key, _, _ in got] == [os.path.splitext(tree.rel(i))[0] for i in placed]


def test_wids_reads_the_index(demo_small, tmp_path):
    wids = pytest.importorskip("wids")
    assert shard(str(demo_small), str(tmp_path / "set"), "--shard-size", "8000").returncode == 0
    tree = scan(demo_small / "train")
    placed = ShardIndex.open(LocalShardStore(tmp_path / "set"), "train").storage_order().tolist()
    ds = wids.ShardListDataset(str(tmp_path / "set" / "train.index.json"), cache_dir=str(tmp_path / "wc"),
                                 transformations=[])  # the raw members, not wids' PIL decode
    assert len(ds) == len(tree)
    for j, i in enumerate(placed):  # wids' sample j is the j-th in the shards (the index's per-shard counts)
        sample = ds[j]
        assert int(sample[".cls"].read() if hasattr(sample[".cls"], "read") else sample[".cls"]) == tree.label(i)
        png = sample[".png"]
        assert (png.read() if hasattr(png, "read") else png) == tree.read(i)


def test_shards_from_webdatasets_shardwriter_train_after_index_only(demo_small, tmp_path):
    wds = pytest.importorskip("webdataset")
    tree = scan(demo_small / "train")
    out = tmp_path / "foreign"
    out.mkdir()
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=50) as sink:
        for i in range(len(tree)):
            sink.write({"__key__": f"s{i:05d}", "png": tree.read(i), "cls": tree.label(i)})
    (tmp_path / "classes.json").write_text(json.dumps(list(tree.classes)))
    res = shard("--index-only", *sorted(glob.glob(str(out / "train-*.tar"))), "--classes",
                str(tmp_path / "classes.json"))
    assert res.returncode == 0, res.stderr
    index = ShardIndex.open(LocalShardStore(out), "train")
    assert index.classes == tree.classes and len(index) == len(tree)
    assert all(index.read(i) == tree.read(i) and index.label(i) == tree.label(i) for i in range(len(tree)))
    r = run([PY, str(ROOT / "launch.py"), f"data.root={out}", f"output_dir={tmp_path / 'run'}",
             "model.name=tiny_cnn_bn", "data.image_size=16", "data.batch_size=8", "data.num_workers=0",
             "train.epochs=1", "data.val_fraction=0.2"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_index_only_maps_txt_class_names_and_names_an_unknown_one(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    with tarfile.open(out / "val-000000.tar", "w") as tf:
        for key, name in [("a", "cat"), ("b", "dog"), ("c", "bird")]:
            for ext, data in [("jpg", b"\xff\xd8 not really"), ("txt", name.encode())]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                import io
                tf.addfile(info, io.BytesIO(data))
    (tmp_path / "c.json").write_text(json.dumps(["cat", "dog"]))
    res = shard("--index-only", str(out / "val-000000.tar"), "--classes", str(tmp_path / "c.json"))
    assert res.returncode == 2
    assert "'bird'" in res.stderr and "not in --classes" in res.stderr
    (tmp_path / "c.json").write_text(json.dumps(["bird", "cat", "dog"]))
    res = shard("--index-only", str(out / "val-000000.tar"), "--classes", str(tmp_path / "c.json"))
    assert res.returncode == 0, res.stderr
    index = ShardIndex.open(LocalShardStore(out), "val")
    assert list(index.labels) == [1, 2, 0] and index.read(2) == b"\xff\xd8 not really"


def test_a_broken_index_or_a_url_without_object_storage_is_one_line(demo_small, tmp_path):
    assert shard(str(demo_small), str(tmp_path / "set"), "--shard-size", "8000").returncode == 0
    (tmp_path / "set" / "train.index.json").write_text('{"__kind__": "wids-shard-index-v1", "shardlist": []}')
    res = run([PY, str(ROOT / "launch.py"), f"data.root={tmp_path / 'set'}", f"output_dir={tmp_path / 'r'}"])
    assert res.returncode == 2
    assert "train.index.json" in res.stderr and "ddp_trainer" in res.stderr and "--index-only" in res.stderr
    try:
        import ddp_trainer.data.remote_shards  # noqa: F401
        return  # object storage is there: its own tests cover URLs
    except ImportError:
        pass
    res = run([PY, str(ROOT / "launch.py"), "data.root=s3://bucket/set", f"output_dir={tmp_path / 'r'}"])
    assert res.returncode == 2 and "data.root=s3://bucket/set needs object storage support" in res.stderr
