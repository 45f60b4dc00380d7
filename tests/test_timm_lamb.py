"""``optim.name=lamb``: timm's LAMB with its defaults, against timm's own optimizer factory, and a
2-process timm run with LAMB and stochastic depth that resumes bitwise (skips where timm is missing)."""
import pytest
import torch
from conftest import launch

from ddp_trainer.config import OptimConfig
from ddp_trainer.models import build_model
from ddp_trainer.training.optim import build_optimizer, optimizer_family

TINY = "test_resnet.r160_in1k"


def _timm():
    return pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[timm]')")


def _steps(model, optimizer, steps=3, seed=100):
    for i in range(steps):
        torch.manual_seed(seed + i)
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.state_dict()


def test_lamb_steps_equal_timm_s_create_optimizer_v2_lamb():
    timm = _timm()
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    ours = build_model(f"timm/{TINY}", 3)
    theirs = build_model(f"timm/{TINY}", 3)
    theirs.load_state_dict(ours.state_dict())
    opt = build_optimizer(ours, OptimConfig(name="lamb", lr=0.01, weight_decay=0.02))
    assert isinstance(opt, timm.optim.Lamb) and optimizer_family(opt.state_dict()) == "lamb"
    ref = create_optimizer_v2(theirs, "lamb", lr=0.01, weight_decay=0.02)  # timm's --opt lamb
    # step by step from the same weights: the global norm is summed in another group order (groups
    # swapped), a few fp32 ulps apart, and a batch-4 BatchNorm would amplify that through later
    # forwards; compared per step, a wrong step (trust ratio, decay, bias correction) is off by ~lr
    for step in range(3):
        a, b = _steps(ours, opt, steps=1, seed=100 + step), _steps(theirs, ref, steps=1, seed=100 + step)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}, {k}: {m}")
        theirs.load_state_dict(ours.state_dict())


# adamw: the drop path's draws must not be shifted by a loader's fresh iterator after the resume;
# lamb: its per-group step count must come back with the moments
@pytest.mark.parametrize("optim", ["lamb", "adamw"])
def test_a_timm_run_with_drop_path_resumes_bitwise_from_its_first_epoch(optim, small_args, tmp_path):
    _timm()
    args = [*small_args, f"model.name=timm/{TINY}", f"optim.name={optim}", "optim.lr=0.01", "model.drop_path_rate=0.1"]
    whole = launch(2, *args, f"output_dir={tmp_path / 'whole'}", "train.epochs=2")
    assert whole.returncode == 0, whole.stderr
    # the same run again from the end of its first epoch (the same config: the schedule counts train.epochs)
    rest = launch(2, *args, f"output_dir={tmp_path / 'parts'}", "train.epochs=2",
                  f"resume={tmp_path / 'whole' / 'checkpoints' / 'epoch_0000.pt'}")
    assert rest.returncode == 0 and "resume: from" in rest.stderr, rest.stderr
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "parts" / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert optimizer_family(b["optimizer"]) == optim
