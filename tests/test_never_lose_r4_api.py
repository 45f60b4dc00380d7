"""Issue 28 D: the Python API keeps its promises (one real script, tests/helpers/api_promises.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import PY, ROOT, child_env, run

HELPERS = ROOT / "tests" / "helpers"


@pytest.fixture(scope="module")
def report(demo_small: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("api")
    res = run([PY, str(HELPERS / "api_promises.py"), str(demo_small), str(out)],
              env=child_env(PYTHONPATH=f"{ROOT}{os.pathsep}{HELPERS}", SLOW_MODEL_SLEEP="0.05"))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_evaluate_takes_the_runs_config(report):
    assert report["with_config"] == report["stored"]


def test_a_partial_mapping_overrides_the_stored_config_instead_of_replacing_it(report):
    assert report["partial"] == pytest.approx(report["stored"], rel=1e-6)  # still at the run's image size


def test_a_model_name_override_is_used_not_ignored(report):
    assert "trained as model.name=tiny_cnn_bn, evaluated as tiny_cnn" in str(report["other_model"]), report["other_model"]


def test_a_second_train_call_while_one_runs_is_refused(report):
    assert report["first_thread"] == 2
    assert report["second_call"].startswith("error: ddp_trainer.train() is already running in this process"), \
        report["second_call"]
