"""Retention never destroys a previous run's best, and starting over never mixes two runs."""
import json
import shutil
import subprocess
import time
from pathlib import Path

import torch
from conftest import PY, ROOT, launch, metrics, our_lines
from test_resume import env, wait_for


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={data}", f"output_dir={out}", "model.name=tiny_cnn_bn", "data.image_size=16",
            "data.batch_size=8", "data.num_workers=0", "optim.lr=0.05", *extra]


def _train(data: Path, out: Path, *extra: str):
    res = launch(0, *_args(data, out, *extra), timeout=180)
    assert res.returncode == 0, res.stderr
    return res


def test_a_folder_holding_only_best_resumes_from_it(demo_small, tmp_path):
    out = tmp_path / "run"
    _train(demo_small, out, "train.epochs=3", "checkpoint.monitor=train_loss")
    ck = out / "checkpoints"
    best_epoch = torch.load(ck / "best.pt", weights_only=True)["epoch"]
    for p in ck.iterdir():
        if p.name != "best.pt":
            p.unlink()
    rows_before = metrics(out)
    res = _train(demo_small, out, "train.epochs=4", "checkpoint.monitor=train_loss")
    # was: resume=auto started afresh without a word, overwrote best.pt and cut metrics.jsonl
    assert f"resume: from {ck / 'best.pt'} (ddp_trainer format), epoch {best_epoch + 1}" in res.stderr
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == list(range(4))
    assert rows[: best_epoch + 1] == rows_before[: best_epoch + 1]  # the epochs best.pt holds stay as they were


def test_another_monitor_ranks_anew_and_keeps_what_the_old_ranking_kept(demo_small, tmp_path):
    out = tmp_path / "run"
    _train(demo_small, out, "train.epochs=3", "checkpoint.keep_best=2", "checkpoint.keep_last=0")
    ck = out / "checkpoints"
    old = {p.name: p.read_bytes() for p in ck.glob("best*.pt")}
    assert len(old) == 3  # best.pt and the 2 best epochs by val_loss
    res = _train(demo_small, out, "train.epochs=5", "checkpoint.keep_best=2", "checkpoint.keep_last=0",
                 "checkpoint.monitor=val_acc", "checkpoint.mode=max")
    assert "the checkpoint's best epochs were ranked by val_loss (min), this run ranks by val_acc (max)" in res.stderr
    assert "best.pt (best by val_loss (min)) kept as best_val_loss_min.pt" in res.stderr
    # was: the old best (a val_loss) was compared with val_acc values and the true best file deleted
    assert (ck / "best_val_loss_min.pt").read_bytes() == old["best.pt"]
    for name, data in old.items():
        if name != "best.pt":
            assert (ck / name).read_bytes() == data, name
    new_rows = metrics(out)[3:]
    state = torch.load(ck / "best.pt", weights_only=True)
    assert state["best"] == max(r["val_acc"] for r in new_rows)  # ranked among this run's epochs only
    assert state["best_k"] == sorted(([r["val_acc"], r["epoch"]] for r in new_rows), key=lambda e: -e[0])[:2]


def test_val_acc5_with_fewer_than_five_classes_is_refused(tmp_path):
    from ddp_trainer.data.demo import write_demo_data

    data = write_demo_data(tmp_path / "d", train_per_class=4, val_per_class=2, size=16)
    for split in ("train", "val"):
        for d in sorted((data / split).iterdir())[3:]:
            shutil.rmtree(d)
    res = launch(0, *_args(data, tmp_path / "run", "checkpoint.monitor=val_acc5", "checkpoint.mode=max"), timeout=120)
    # was: trained, monitoring 0.0 for ever
    assert res.returncode == 2, res.stderr
    (err,) = [l for l in our_lines(res.stderr) if "error:" in l]
    assert "checkpoint.monitor=val_acc5 needs 5 or more classes (the data has 3" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_starting_over_sets_the_earlier_run_aside_and_resume_continues_the_new_one(demo_small, tmp_path):
    out = tmp_path / "run"
    _train(demo_small, out, "train.epochs=4")
    old_last = (out / "checkpoints" / "last.pt").read_bytes()
    res = _train(demo_small, out, "train.epochs=2", "resume=none", "overwrite=true")
    (aside,) = (out / "replaced").iterdir()
    assert f"the earlier run's checkpoints, metrics.jsonl, metrics.csv, train.log, config.yaml moved to {aside}" in res.stderr
    assert (aside / "checkpoints" / "last.pt").read_bytes() == old_last and len(metrics(aside)) == 4
    # was: the new run's epoch files were pruned while the old run's epoch_0002..0004.pt stayed
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "epoch_0000.pt", "epoch_0001.pt",
                                                                      "last.pt"]
    res = _train(demo_small, out, "train.epochs=3")
    assert "resume: from" in res.stderr and "epoch 2, from its start" in res.stderr  # the new run's epoch 2
    assert [r["epoch"] for r in metrics(out)] == [0, 1, 2]


def test_logs_deleted_during_a_run_are_written_again(demo_small, tmp_path):
    out = tmp_path / "run"
    args = _args(demo_small, out, "train.epochs=3", "model.name=slow_model:build", "train.log_every_steps=1")
    proc = subprocess.Popen([PY, str(ROOT / "launch.py"), *args], env=env(SLOW_MODEL_SLEEP="0.1"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "metrics.csv").exists(), proc=proc)  # epoch 0's row in both copies
    (out / "metrics.jsonl").unlink()
    (out / "train.log").unlink()
    time.sleep(0.1)
    assert proc.wait(180) == 0, proc.stderr.read()
    # was: the later lines went to the deleted train.log and were lost
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]  # epoch 0 restored from metrics.csv, the surviving copy
    assert "done: val_loss=" in (out / "train.log").read_text()
