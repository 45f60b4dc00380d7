"""Real 2-process DDP (gloo) steps equal a 1-process run on the combined batch."""
import json
from pathlib import Path

import torch

from conftest import PY, ROOT, TORCHRUN, run

HELPER = str(ROOT / "tests" / "helpers" / "ddp_step.py")


def _params(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


def test_two_processes_batch_b_equal_one_process_batch_2b(tmp_path: Path):
    one = tmp_path / "one.pt"
    two = tmp_path / "two.pt"
    r1 = run([PY, HELPER, str(one), "16", "1", "3"])
    assert r1.returncode == 0, r1.stderr
    r2 = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", HELPER, str(two), "8", "1", "3"])
    assert r2.returncode == 0, r2.stderr
    _close(_params(one), _params(two))
    # and the steps did something: parameters moved away from the initial ones
    torch.manual_seed(0)
    from ddp_trainer.models import TinyCNN

    init = TinyCNN(5).state_dict()
    assert not torch.allclose(init["fc.weight"], _params(one)["fc.weight"])


def test_gradient_accumulation_equals_big_batch_and_syncs_once_per_step(tmp_path: Path):
    big = tmp_path / "big.pt"
    acc = tmp_path / "acc.pt"
    r1 = run([PY, HELPER, str(big), "16", "1", "3"])
    assert r1.returncode == 0, r1.stderr
    r2 = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", HELPER, str(acc), "4", "2", "3"])
    assert r2.returncode == 0, r2.stderr
    _close(_params(big), _params(acc))
    info = json.loads(Path(str(acc) + ".json").read_text())
    assert info["steps"] == 3 and info["world"] == 2
    assert info["allreduce_calls"] == 3  # one all-reduce per optimizer step, none on accumulation steps
