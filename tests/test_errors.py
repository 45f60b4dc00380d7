"""Bad input: one clear line naming the cause and the fix, printed once, non-zero exit, nothing lost."""
import shutil
import time
from pathlib import Path

from conftest import ROOT, launch, our_lines


def _errors(stderr: str) -> list[str]:
    return [l for l in our_lines(stderr) if "error:" in l]


def _copy(demo_small: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(demo_small, root)
    return root


def _no_traceback_from_us(stderr: str) -> None:
    assert str(ROOT / "ddp_trainer") not in stderr


def test_missing_data_folder_two_ranks_one_line(small_args, tmp_path: Path):
    res = launch(2, *small_args, f"data.root={tmp_path / 'nope'}", timeout=120)
    assert res.returncode != 0
    errs = _errors(res.stderr)
    assert len(errs) == 1, res.stderr
    assert "data folder" in errs[0] and "nope" in errs[0] and "data.root" in errs[0]
    _no_traceback_from_us(res.stderr)


def test_val_with_other_classes(small_args, demo_small: Path, tmp_path: Path):
    root = _copy(demo_small, tmp_path)
    shutil.rmtree(root / "val" / "ring_cool")
    res = launch(0, *small_args, f"data.root={root}", timeout=120)
    assert res.returncode == 2
    (err,) = _errors(res.stderr)
    assert "missing in val: ['ring_cool']" in err and str(root / "val") in err
    _no_traceback_from_us(res.stderr)


def test_configured_class_without_folder(small_args, demo_small: Path):
    from ddp_trainer.data.demo import CLASSES

    names = ",".join(list(CLASSES) + ["zebra"])
    res = launch(0, *small_args, f"data.classes=[{names}]", timeout=120)
    assert res.returncode == 2
    (err,) = _errors(res.stderr)
    assert "'zebra'" in err and "data.classes" in err


def _corrupt(root: Path) -> Path:
    victim = sorted((root / "train" / "square_warm").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated PNG
    return victim


def test_corrupt_image_is_an_error_naming_the_file(small_args, demo_small: Path, tmp_path: Path):
    root = _copy(demo_small, tmp_path)
    victim = _corrupt(root)
    res = launch(0, *small_args, f"data.root={root}", timeout=120)
    assert res.returncode == 2, res.stderr
    (err,) = _errors(res.stderr)
    assert str(victim) in err and "data.bad_images=skip" in err
    _no_traceback_from_us(res.stderr)


def test_corrupt_image_skip_warns_with_a_count_and_trains(small_args, demo_small: Path, tmp_path: Path):
    root = _copy(demo_small, tmp_path)
    _corrupt(root)
    res = launch(0, *small_args, f"data.root={root}", "data.bad_images=skip", "train.epochs=1", timeout=120)
    assert res.returncode == 0, res.stderr
    assert "skipped 1 unreadable train image(s)" in res.stderr
    assert "119 train / 40 val images" in res.stderr


def test_failure_on_one_rank_ends_the_job_promptly(small_args, demo_small: Path, tmp_path: Path):
    root = _copy(demo_small, tmp_path)
    victim = _corrupt(root)
    t0 = time.monotonic()
    res = launch(2, *small_args, f"data.root={root}", "dist.timeout_s=60", timeout=120)
    assert res.returncode != 0
    assert time.monotonic() - t0 < 60  # well before the collective timeout
    assert sum(str(victim) in l for l in _errors(res.stderr)) == 1, res.stderr


def test_resume_none_over_checkpoints_is_refused_and_keeps_them(small_args, tmp_path: Path):
    ok = launch(0, *small_args, "train.epochs=1", timeout=120)
    assert ok.returncode == 0, ok.stderr
    ck = tmp_path / "run" / "checkpoints"
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    metrics_before = (tmp_path / "run" / "metrics.jsonl").read_text()
    res = launch(0, *small_args, "resume=none", timeout=120)
    assert res.returncode == 2
    (err,) = _errors(res.stderr)
    assert "resume=none" in err and "overwrite=true" in err and "resume=auto" in err
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics_before
