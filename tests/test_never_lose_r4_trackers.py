"""Round 4, F and the D leftovers: a tracker never fails nor holds up a run (TensorBoard missing is
one warning like W&B or MLflow missing; a slow or failing tracker logs from a background queue with
bounded waits); metrics.jsonl and metrics.csv each restore the other, and a damaged line is named
and skipped; train() in a thread stops on Ctrl-C and returns only after its threads have ended."""
import importlib.util
from pathlib import Path

import pytest
from conftest import launch, metrics


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_missing_is_one_warning_and_the_run_goes_on(small_args, tmp_path: Path):
    res = launch(0, *small_args, "train.epochs=1", "log.tensorboard=true", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]  # was: exit 2 before the first step
    warnings = [l for l in res.stderr.splitlines() if "log.tensorboard" in l]
    assert len(warnings) == 1 and "pip install" in warnings[0] and "goes on" in warnings[0], warnings
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == [0]


def _resume_args(small_args: list[str], epochs: int) -> list[str]:
    return [a for a in small_args if not a.startswith("train.epochs=")] + [f"train.epochs={epochs}"]


def test_a_resume_restores_metrics_jsonl_from_metrics_csv(small_args, tmp_path: Path):
    out = tmp_path / "run"
    first = launch(0, *_resume_args(small_args, 2), timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    table = (out / "metrics.csv").read_text()
    rows = metrics(out)
    (out / "metrics.jsonl").unlink()
    (out / "train.log").unlink()
    second = launch(0, *_resume_args(small_args, 3), "resume=auto", timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "restored from metrics.csv" in second.stderr, second.stderr[-2000:]
    again = metrics(out)
    assert [r["epoch"] for r in again] == [0, 1, 2]  # was: only epoch 2, the csv rebuilt from the empty jsonl
    assert again[:2] == rows  # the same values and types as the lost lines
    assert (out / "metrics.csv").read_text().startswith(table)  # the table's intact rows kept, epoch 2 added


def test_a_damaged_line_in_metrics_jsonl_is_named_and_skipped(small_args, tmp_path: Path):
    out = tmp_path / "run"
    first = launch(0, *_resume_args(small_args, 2), timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    lines = (out / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (out / "metrics.jsonl").write_bytes(lines[0] + b'{"epoch": 9, "val_loss": "\xff"}\n' + lines[1])
    (out / "metrics.csv").unlink()
    second = launch(0, *_resume_args(small_args, 3), "resume=auto", timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]  # was: a raw UnicodeDecodeError naming no file
    named = [l for l in second.stderr.splitlines() if "metrics.jsonl: line 2 is damaged" in l]
    assert len(named) == 1 and "not UTF-8" in named[0] and str(out) in named[0], second.stderr[-2000:]
    assert [r["epoch"] for r in metrics(out)] == [0, 1, 2]
