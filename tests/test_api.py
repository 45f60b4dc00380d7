"""The Python API (train, evaluate) in one process called twice, and the engines beside torchrun:
Kubeflow's pods started by hand with the operator's variables."""
import csv
import json
import socket
import subprocess

from conftest import PY, ROOT, child_env, metrics, run

HELPERS = ROOT / "tests" / "helpers"


def test_train_twice_and_evaluate_in_one_process(demo_small, tmp_path):
    res = run([PY, str(HELPERS / "api_twice.py"), str(demo_small), str(tmp_path / "run")], timeout=240)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    first, second = out["final"]
    assert first == {**second, "epoch_time_s": first["epoch_time_s"], "images_per_s": first["images_per_s"],
                     "train_time_s": first["train_time_s"], "data_wait_frac": first["data_wait_frac"],
                     "peak_rss_mb": first["peak_rss_mb"]}  # the same run twice: the same figures
    assert out["epochs_run"] == 2 and out["monitor"] == "val_loss"
    assert out["best"] == min(r["val_loss"] for r in metrics(tmp_path / "run"))
    assert out["checkpoints"]["best"] == str(tmp_path / "run" / "checkpoints" / "best.pt")
    assert out["evaluated"]["val_acc"] == second["val_acc"] and out["evaluated"]["count"] == second["val_count"]
    assert out["error"] == "train.epochs: bad value 0; use at least 1"  # raised, not an exit
    assert out["handlers_restored"] and out["wakeup_restored"]  # no signal handling left behind
    # each call logs through its own console handler and takes it away again: none is left, none piles up
    assert out["threads"] == ["MainThread"] and out["log_handlers"] == 0
    assert res.stderr.count("done: val_loss=") == 2
    # metrics.csv: the same rows and columns as metrics.jsonl
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    rows = metrics(tmp_path / "run")
    assert list(table[0]) == list(rows[0]) and len(table) == len(rows) == 2
    assert all(float(t["val_loss"]) == r["val_loss"] and int(t["epoch"]) == r["epoch"] for t, r in zip(table, rows))


def test_kubeflow_pods_started_by_hand_train_together(demo_small, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pods = []
    for rank in (0, 1):  # each pod: its own node-local cache folder, the operator's variables, no LOCAL_RANK
        env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                        KUBERNETES_SERVICE_HOST="10.96.0.1", DDP_TRAINER_CACHE=str(tmp_path / f"pod{rank}"))
        pods.append(subprocess.Popen(
            [PY, str(ROOT / "launch.py"), f"data.root={demo_small}", f"output_dir={tmp_path / 'run'}",
             "model.name=tiny_cnn_bn", "data.image_size=16", "data.batch_size=8", "data.num_workers=0",
             "train.epochs=1", "data.cache=decoded"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True))
    logs = [p.communicate(timeout=180)[1] for p in pods]
    assert [p.returncode for p in pods] == [0, 0], logs
    assert "launch: DDP world_size=2 nodes=2 backend=gloo device=cpu (Kubeflow PyTorchJob)" in logs[0]
    # each pod is a node of one process: each built its own decoded cache (was: pod 1 waited for a
    # "local rank 0" on another pod)
    for rank in (0, 1):
        assert len(list((tmp_path / f"pod{rank}" / "decoded").glob("decoded-*.u8"))) == 2
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == [0]
