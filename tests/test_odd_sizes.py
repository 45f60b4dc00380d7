"""Odd dataset sizes end to end: a one-sample tail, one image per class, sets too small to train."""
from collections import Counter
from pathlib import Path

import pytest
from conftest import child_env, launch, metrics, our_lines

from ddp_trainer.data.demo import write_demo_data


@pytest.fixture(scope="module")
def data_161(tmp_path_factory) -> Path:
    """161 training images (a one-sample tail for batch 16 x 2 processes), 20 val images, 32 px."""
    root = write_demo_data(tmp_path_factory.mktemp("d161"), train_per_class=17, val_per_class=2, size=32)
    files = sorted((root / "train").rglob("*.png"))
    for f in files[::19][:9]:  # 170 -> 161, taken from several classes
        f.unlink()
    assert len(list((root / "train").rglob("*.png"))) == 161
    return root


def _seen(folder: Path) -> Counter:
    rows = [line.split() for f in folder.iterdir() for line in f.read_text().splitlines()]
    return Counter((int(e), int(i)) for e, i in rows)


@pytest.mark.slow
@pytest.mark.parametrize("drop_last", [True, False])
def test_161_images_batch_16_two_processes_resnet18_trains(data_161: Path, tmp_path: Path, drop_last: bool):
    rec = tmp_path / "rec"
    rec.mkdir()
    out = tmp_path / "run"
    res = launch(2, f"data.root={data_161}", f"output_dir={out}", "model.name=resnet18", "data.image_size=32",
                 "data.batch_size=16", "data.num_workers=0", "train.epochs=2", f"data.drop_last={str(drop_last).lower()}",
                 env=child_env(FAULT_RECORD_SAMPLES=str(rec)), timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Expected more than 1 value per channel" not in res.stderr
    assert [r["epoch"] for r in metrics(out)] == [0, 1]
    seen = _seen(rec)
    for epoch in (0, 1):
        ids = [i for (e, i), c in seen.items() for _ in range(c) if e == epoch]
        if drop_last:
            assert len(ids) == 160 and len(set(ids)) == 160  # the one-sample tail left out
        else:
            assert sorted(ids) == list(range(161))  # every image once, the tail folded in
    if drop_last:
        left_out = [set(range(161)) - {i for (e, i) in seen if e == epoch} for epoch in (0, 1)]
        assert left_out[0] != left_out[1]  # a different tail each epoch
        assert "data.drop_last: the last 1 sample(s) of each epoch's order are left out" in res.stderr


@pytest.mark.slow
def test_one_image_per_class_smaller_than_a_global_batch_trains_one_partial_step(tmp_path: Path):
    root = write_demo_data(tmp_path / "data", train_per_class=1, val_per_class=1, size=16)
    out = tmp_path / "run"
    res = launch(2, f"data.root={root}", f"output_dir={out}", "model.name=tiny_cnn_bn", "data.image_size=16",
                 "data.batch_size=8", "data.num_workers=0", "train.epochs=2")
    assert res.returncode == 0, res.stderr
    assert "the 10 training images are fewer than one global batch; each epoch is one partial optimizer step" \
        in res.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_fewer_images_than_two_per_process_is_a_clear_error(tmp_path: Path):
    root = tmp_path / "data"
    write_demo_data(root, train_per_class=1, val_per_class=1, size=16)
    import shutil
    for d in sorted((root / "train").iterdir())[2:]:
        shutil.rmtree(d)
        shutil.rmtree(root / "val" / d.name)
    res = launch(2, f"data.root={root}", f"output_dir={tmp_path / 'run'}", "model.name=tiny_cnn",
                 "data.image_size=16", "data.num_workers=0", timeout=120)
    assert res.returncode != 0 and "exitcode: 2" in res.stderr, res.stderr  # torchrun itself exits 1
    errs = [line for line in our_lines(res.stderr) if "error:" in line]
    assert len(errs) == 1, res.stderr
    assert "the training set has 2 image(s), fewer than 2 per process for 2 process(es)" in errs[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_batch_of_one_with_batchnorm_is_a_clear_error(small_args):
    res = launch(0, *small_args, "data.batch_size=1", timeout=120)
    assert res.returncode == 2, res.stderr
    assert "data.batch_size=1 with a model that has BatchNorm layers" in res.stderr
    assert "use data.batch_size=2 or more" in res.stderr


def test_batch_of_one_without_batchnorm_trains(small_args):
    res = launch(0, *small_args, "model.name=tiny_cnn", "data.batch_size=1", "train.epochs=1", timeout=120)
    assert res.returncode == 0, res.stderr
