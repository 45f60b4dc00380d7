"""Experiment trackers against the real packages, offline: after a kill that lands between an epoch's
logged row and its checkpoint, and a resume, there is one tracker run whose history holds every
epoch exactly once. Skipped with a reason when the extra is not installed (.ci/run installs it)."""
import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import child_env, launch, metrics

from ddp_trainer.trackers import settled, wandb_file_records


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={data}", f"output_dir={out}", "model.name=tiny_cnn_bn", "data.image_size=16",
            "data.batch_size=8", "data.num_workers=0", "train.epochs=3", "checkpoint.every_steps=4", *extra]


def _kill_after_epoch_1_then_resume(args: list[str], **env: str) -> None:
    first = launch(0, *args, timeout=180, env=child_env(FAULT_EXIT_AFTER_ROW="1", **env))
    # epoch 1's row went to the tracker; its checkpoint was never written: the resume trains it again
    assert first.returncode == 9 and "exiting after epoch 1's row, before its checkpoint" in first.stderr, \
        first.stderr[-2000:]
    second = launch(0, *args, timeout=180, env=child_env(**env))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resume: from" in second.stderr and "epoch 1," in second.stderr


def test_mlflow_continues_its_run_with_every_epoch_once(demo_small, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install -e '.[mlflow]')")
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when asked to

    out = tmp_path / "run"
    uri = f"file://{tmp_path / 'mlruns'}"
    _kill_after_epoch_1_then_resume(_args(demo_small, out, "log.mlflow=true", f"log.mlflow_uri={uri}"))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("ddp_trainer")
    (one,) = client.search_runs([experiment.experiment_id])  # was: no tracker; a resume must not start a second run
    history = client.get_metric_history(one.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == [0, 1, 2]  # each epoch once, epoch 1 not twice
    rows = {r["epoch"]: r for r in metrics(out)}
    assert all(m.value == rows[m.step]["val_loss"] for m in history)  # resume is exact: the same values
    assert one.data.params["train.epochs"] == "3" and one.info.status == "FINISHED"


def test_wandb_offline_continues_its_run_with_every_epoch_once(demo_small, tmp_path):
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install -e '.[wandb]')")
    from wandb.proto import wandb_internal_pb2

    out = tmp_path / "run"
    _kill_after_epoch_1_then_resume(_args(demo_small, out, "log.wandb=true"), WANDB_SILENT="true")
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    ids = {f.name.removeprefix("run-").removesuffix(".wandb") for f in files}
    assert len(files) == 2 and len(ids) == 1  # two starts of one run (W&B joins them on sync)
    steps, config = Counter(), None
    for f in files:
        for data in wandb_file_records(f):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                steps[int(items["_step"])] += 1
            elif kind == "run" and config is None:  # the config travels in the run's record
                config = {i.key: json.loads(i.value_json) for i in rec.run.config.update}
    assert sorted(steps) == [0, 1, 2] and set(steps.values()) == {1}, steps
    assert config is not None and config["train"]["epochs"] == 3


def test_a_tracker_that_cannot_start_is_one_warning(small_args, tmp_path):
    # a tracking URI that cannot be used (a file where the store's folder should be)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    res = launch(0, *small_args, "train.epochs=1", "log.mlflow=true", f"log.mlflow_uri=file://{blocker}/mlruns",
                 timeout=180)
    assert res.returncode == 0, res.stderr
    warnings = [l for l in res.stderr.splitlines() if "log.mlflow" in l]
    try:
        import mlflow  # noqa: F401
        why = "cannot start"
    except ImportError:
        why = "not installed"
    assert len(warnings) == 1 and why in warnings[0], warnings


def test_the_wandb_file_reader_reads_what_wandb_wrote(tmp_path, monkeypatch):
    """The reader the resume relies on, against a file wandb itself wrote: every logged step, a
    record larger than a block (split in parts), and a torn tail."""
    monkeypatch.setenv("WANDB_SERVICE", "")  # wandb.init sets it for the whole process: teardown restores it
    monkeypatch.delenv("WANDB_SERVICE")
    wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install -e '.[wandb]')")
    from wandb.proto import wandb_internal_pb2
    run = wandb.init(mode="offline", dir=str(tmp_path), project="p", settings=wandb.Settings(silent=True))
    for step in range(5):
        run.log({"x": step * 0.5, "note": "y" * (70000 if step == 2 else 1)}, step=step)  # step 2 spans 3 blocks
    run.finish()
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    settled(path)  # finish() returns before wandb-core has written the last blocks (1 run in 6 here)

    def history(p):
        out = {}
        for data in wandb_file_records(p):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                out[rec.history.step.num] = items
        return out
    rows = history(path)
    assert sorted(rows) == [0, 1, 2, 3, 4] and [rows[s]["x"] for s in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert len(rows[2]["note"]) == 70000
    torn = tmp_path / "torn.wandb"
    torn.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])  # cut mid-file: the scan stops, no error
    assert set(history(torn)) < set(rows)
