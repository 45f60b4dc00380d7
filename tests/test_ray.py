"""Ray Train with the real ray package (the ray extra; skipped with a reason without it, .ci/run
installs it): the run uses Ray's process group, reports to Ray, survives a killed worker by Ray's
restart and its own resume, and ends bitwise equal to a torchrun run of the same settings."""
import json

import pytest
import torch
from conftest import PY, ROOT, TORCHRUN, child_env, metrics, run

HELPERS = ROOT / "tests" / "helpers"


def _settings(data, out) -> dict:
    return {"data": {"root": str(data), "image_size": 16, "batch_size": 8, "num_workers": 0},
            "model": {"name": "tiny_cnn_bn"}, "train": {"epochs": 2}, "checkpoint": {"every_steps": 3},
            "optim": {"lr": 0.01}, "seed": 5, "output_dir": str(out)}


def _overrides(settings: dict) -> list[str]:
    flat = [f"{section}.{k}={v}" for section, values in settings.items() if isinstance(values, dict)
            for k, v in values.items()]
    return flat + [f"{k}={v}" for k, v in settings.items() if not isinstance(v, dict)]


def test_ray_train_restarts_a_killed_worker_and_equals_torchrun(demo_small, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_CLIENT_MODE", "")  # importing ray sets it for the whole process: teardown restores it
    monkeypatch.delenv("RAY_CLIENT_MODE")
    # in the test, not the module: a module-level skip shows in runs that deselect it (-m stacks)
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    reference = tmp_path / "torchrun"
    res = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"),
               *_overrides(_settings(demo_small, reference))], timeout=240)
    assert res.returncode == 0, res.stderr
    out, marker = tmp_path / "ray_run", tmp_path / "killed-once"
    env = child_env(FAULT_EXIT_AT_STEP=f"1:5:{marker}", PYTHONPATH=f"{ROOT}:{HELPERS}")
    reports = tmp_path / "reports.jsonl"
    res = run([PY, str(HELPERS / "ray_train.py"), json.dumps(_settings(demo_small, out)), str(tmp_path / "ray"),
               str(reports)], env=env, timeout=420)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["error"] is None
    assert marker.exists()  # rank 1 died after step 5 of the first attempt; Ray started the group again
    said = res.stdout + res.stderr  # Ray forwards its workers' output to the driver
    assert "launch: DDP world_size=2 nodes=1 backend=gloo device=cpu (Ray Train)" in said, said[-3000:]
    assert "using the gloo process group the launching engine started" in said  # never a second group
    assert "resume: from" in (out / "train.log").read_text()  # the restarted workers resumed from its checkpoint
    # every worker reported each epoch once (the attempt that lost a worker had finished none)
    reported = [json.loads(line) for line in reports.read_text().splitlines()]
    assert [[m["epoch"] for m in workers] for workers in reported] == [[0, 0], [1, 1]]
    assert [workers[0]["val_loss"] for workers in reported] == [r["val_loss"] for r in metrics(out)]
    a = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
