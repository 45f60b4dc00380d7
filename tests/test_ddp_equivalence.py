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


def _steps(out: Path, nproc: int, batch: int, accum: int) -> dict:
    """3 optimizer steps of the helper (plain python for 1 process, torchrun for more); its parameters."""
    launcher = [PY] if nproc == 1 else [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"]
    res = run([*launcher, HELPER, str(out), str(batch), str(accum), "3"])
    assert res.returncode == 0, res.stderr
    return _params(out)


def test_two_processes_batch_b_equal_one_process_batch_2b(tmp_path: Path):
    one = tmp_path / "one.pt"
    _close(_steps(one, 1, 16, 1), _steps(tmp_path / "two.pt", 2, 8, 1))
    # and the steps did something: parameters moved away from the initial ones
    torch.manual_seed(0)
    from ddp_trainer.models import TinyCNN

    init = TinyCNN(5).state_dict()
    assert not torch.allclose(init["fc.weight"], _params(one)["fc.weight"])


def test_gradient_accumulation_equals_big_batch_and_syncs_once_per_step(tmp_path: Path):
    acc = tmp_path / "acc.pt"
    _close(_steps(tmp_path / "big.pt", 1, 16, 1), _steps(acc, 2, 4, 2))
    info = json.loads(Path(str(acc) + ".json").read_text())
    assert info["steps"] == 3 and info["world"] == 2
    assert info["allreduce_calls"] == 3  # one all-reduce per optimizer step, none on accumulation steps
