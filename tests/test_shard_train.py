"""Training on a shard set: a 2-process run on the shards made from a tree is bitwise equal to the
run on the tree (three samplers; shards placed shuffled and in the tree's order), a mid-epoch
checkpoint resumes bitwise on shards, and damaged shards are named (or their samples skipped with
data.bad_images=skip)."""
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PY, kept_mid_epoch, launch, run

from ddp_trainer.data.shard_set import ShardIndex
from ddp_trainer.data.shard_store import LocalShardStore


def make_shards(tree: Path, out: Path, size: int = 6000, *flags: str) -> Path:
    res = run([PY, "-m", "ddp_trainer", "shard", str(tree), str(out), "--shard-size", str(size), *flags])
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def shards(demo_small: Path, tmp_path_factory) -> Path:
    """The shards of ``demo_small`` as ``shard`` writes them by default: placed shuffled."""
    return make_shards(demo_small, tmp_path_factory.mktemp("shards") / "set")


@pytest.fixture(scope="module")
def tree_order_shards(demo_small: Path, tmp_path_factory) -> Path:
    return make_shards(demo_small, tmp_path_factory.mktemp("tree_order_shards") / "set", 6000, "--no-shuffle")


def args(root: Path, sampler: str, epochs: int = 2) -> list[str]:
    return [f"data.root={root}", "model.name=tiny_cnn_bn", "data.image_size=16", "data.batch_size=8",
            "data.num_workers=1", "data.augment=[flip,random_resized_crop]", f"data.sampler={sampler}",
            f"train.epochs={epochs}", "checkpoint.every_steps=3", "optim.lr=0.05", "seed=3"]


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("sampler,placement", [("plan", "shuffled"), ("distributed", "shuffled"),
                                               ("repeated_augment", "shuffled"), ("plan", "tree_order")])
def test_two_process_run_on_shards_is_bitwise_the_run_on_the_tree(sampler, placement, demo_small, request,
                                                                   reference_run):
    # the placement changes where a sample's bytes lie, never which sample is sample i
    shards = request.getfixturevalue("shards" if placement == "shuffled" else "tree_order_shards")
    if placement == "shuffled":
        ids = ShardIndex.open(LocalShardStore(shards), "train").shard_ids.tolist()
        assert ids != sorted(ids)
    tree = reference_run(2, args(demo_small, sampler))
    on_shards = reference_run(2, args(shards, sampler))
    assert "shards" in on_shards.stderr or str(shards) in on_shards.stderr
    assert_same(weights(tree.path), weights(on_shards.path))
    # the validation each epoch saw the same samples: the same figures
    t = [l for l in (tree.path / "metrics.jsonl").read_text().splitlines() if '"val_acc"' in l]
    s = [l for l in (on_shards.path / "metrics.jsonl").read_text().splitlines() if '"val_acc"' in l]
    assert len(t) == len(s) == 2
    for a, b in zip(t, s):
        import json
        ja, jb = json.loads(a), json.loads(b)
        assert (ja["val_acc"], ja["val_loss"]) == (jb["val_acc"], jb["val_loss"])


def test_mid_epoch_resume_on_shards_is_bitwise(shards, reference_run, tmp_path):
    ref = reference_run(2, args(shards, "plan"))
    out = tmp_path / "run"
    state = kept_mid_epoch(ref.kept, out)
    res = launch(2, *args(shards, "plan"), f"output_dir={out}")
    assert res.returncode == 0, res.stderr
    assert f"{state['position']} samples into the epoch" in res.stderr
    assert_same(weights(ref.path), weights(out))


def test_val_fraction_holds_out_of_shards_as_of_the_tree(demo_small, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(demo_small / "train", tree / "train")
    out = make_shards(tree, tmp_path / "set")
    assert not (out / "val.index.json").exists()
    a = ["model.name=tiny_cnn_bn", "data.image_size=16", "data.batch_size=8", "data.num_workers=0",
         "train.epochs=1", "data.val_fraction=0.25", "seed=1"]
    r1 = launch(1, f"data.root={tree}", f"output_dir={tmp_path / 'r1'}", *a)
    r2 = launch(1, f"data.root={out}", f"output_dir={tmp_path / 'r2'}", *a)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert_same(weights(tmp_path / "r1"), weights(tmp_path / "r2"))


def damaged_copy(shards: Path, into: Path) -> tuple[Path, ShardIndex]:
    shutil.copytree(shards, into)
    return into, ShardIndex.open(LocalShardStore(into), "train")


def test_a_flipped_byte_is_named_with_shard_and_member(shards, tmp_path):
    root, index = damaged_copy(shards, tmp_path / "set")
    i = 5
    shard = root / index.shard_names[int(index.shard_ids[i])]
    data = bytearray(shard.read_bytes())
    data[int(index.table.offset[i]) + 20] ^= 0xFF
    shard.write_bytes(bytes(data))
    from ddp_trainer.errors import ImageError
    with pytest.raises(ImageError, match=rf"{shard.name}:{index.rel(i)}.*crc32"):
        index.read(i)
    assert index.read(i - 1)  # its neighbours still read
    res = launch(1, f"data.root={root}", f"output_dir={tmp_path / 'run'}", "model.name=tiny_cnn_bn",
                 "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "train.epochs=1")
    assert res.returncode != 0
    assert index.rel(i) in res.stderr and shard.name in res.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists() is False
    ok = launch(1, f"data.root={root}", f"output_dir={tmp_path / 'skip'}", "model.name=tiny_cnn_bn",
                "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "train.epochs=1",
                "data.bad_images=skip")
    assert ok.returncode == 0, ok.stderr
    assert "skipped 1 unreadable train image" in ok.stderr


def test_a_truncated_shard_is_named_in_one_line(shards, tmp_path):
    root, index = damaged_copy(shards, tmp_path / "set")
    shard = root / index.shard_names[int(index.shard_ids[0])]
    shard.write_bytes(shard.read_bytes()[:-1500])
    from ddp_trainer.errors import DataError
    with pytest.raises(DataError, match=rf"shard '.*{shard.name}' is \d+ bytes, its index says"):
        index.read(0)


def test_a_member_that_is_not_the_indexed_one_is_named(shards, tmp_path):
    root, index = damaged_copy(shards, tmp_path / "set")
    # shard 0 replaced by shard 1, padded to the same size: the offsets point at other members
    a, b = root / index.shard_names[0], root / index.shard_names[1]
    size = a.stat().st_size
    a.write_bytes((b.read_bytes() + b"\0" * size)[:size])
    from ddp_trainer.errors import ImageError
    bad = 0
    for i in [i for i, k in enumerate(index.shard_ids.tolist()) if k == 0]:  # shard 0's samples
        try:
            index.read(i)
        except ImageError as exc:
            assert a.name in str(exc) and ("not the indexed member" in str(exc) or "crc32" in str(exc))
            bad += 1
    assert bad >= 1


def test_check_verifies_shards_and_names_a_damaged_member(demo_small, shards, tmp_path):
    tree = run([PY, "-m", "ddp_trainer", "check", f"data.root={demo_small}", "--verify"])
    ok = run([PY, "-m", "ddp_trainer", "check", f"data.root={shards}", "--verify"])
    assert tree.returncode == 0 and ok.returncode == 0, tree.stderr + ok.stderr
    counts = [l for l in ok.stdout.splitlines() if "images in" in l]
    assert counts and counts == [l for l in tree.stdout.splitlines() if "images in" in l]
    root, index = damaged_copy(shards, tmp_path / "set")
    shard = root / index.shard_names[int(index.shard_ids[0])]
    data = bytearray(shard.read_bytes())
    data[int(index.table.offset[0]) + 30] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = run([PY, "-m", "ddp_trainer", "check", f"data.root={root}", "--verify"])
    assert bad.returncode == 2
    assert index.rel(0) in bad.stdout + bad.stderr


def test_decoded_cache_on_shards_trains_as_on_the_tree(demo_small, shards, tmp_path):
    a = ["model.name=tiny_cnn_bn", "data.image_size=16", "data.batch_size=8", "data.num_workers=0",
         "train.epochs=1", "data.cache=decoded", f"data.cache_dir={tmp_path / 'cache'}", "seed=2"]
    r1 = launch(1, f"data.root={demo_small}", f"output_dir={tmp_path / 'r1'}", *a)
    r2 = launch(1, f"data.root={shards}", f"output_dir={tmp_path / 'r2'}", *a)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert_same(weights(tmp_path / "r1"), weights(tmp_path / "r2"))
    assert any((tmp_path / "cache").rglob("*"))  # the run on shards went through the decoded cache
