"""Execution modes (pure decision), DataParallel wrapping on CPU, debug mode, precision and knobs."""
import itertools
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from conftest import ROOT, child_env, launch
from torch import nn

from ddp_trainer.checkpoint.weights import canonical_state_dict
from ddp_trainer.config import load
from ddp_trainer.data.samplers import EpochPlan
from ddp_trainer.data.transforms import Normalize
from ddp_trainer.errors import ConfigError
from ddp_trainer.launch.dist import Dist
from ddp_trainer.launch.environment import LaunchEnv
from ddp_trainer.launch.mode import ModeDecision, decide_mode, unwrap, wrap
from ddp_trainer.launch.signals import StopRequest
from ddp_trainer.models import TinyCNN
from ddp_trainer.training.build import build_trainer
from ddp_trainer.training.engine import Engine
from ddp_trainer.training.trainer import Trainer


def expected(request, backend, world, local_world, gpus, launched):
    """The documented rules, written independently of the implementation."""
    if backend == "nccl" and gpus == 0:
        return "error"
    mode = request if request != "auto" else ("ddp" if world > 1 else ("dp" if gpus > 1 else "single"))
    if mode == "ddp":
        if world < 2 and not launched:
            return "error"
        cuda = gpus > 0 and backend != "gloo"
        chosen = backend if backend != "auto" else ("nccl" if cuda else "gloo")
        return ("ddp", chosen, cuda)  # two ranks on one GPU: told by the devices' UUIDs (test_gpu_placement)
    if world > 1:
        return "error"
    if mode == "dp":
        return "error" if gpus == 0 else ("dp", None, True)
    return ("single", None, gpus > 0)


@pytest.mark.parametrize("request_, backend, world, gpus, launched",
                         [c for c in itertools.product(["auto", "ddp", "dp", "single"], ["auto", "nccl", "gloo"],
                                                       [1, 2, 4], [0, 1, 2, 4], [False, True])
                          if c[4] or c[2] == 1])  # several processes only come from a launcher
def test_mode_decision_every_combination(request_, backend, world, gpus, launched):
    local_world = world  # one node
    want = expected(request_, backend, world, local_world, gpus, launched)
    if want == "error":
        with pytest.raises(ConfigError) as info:
            decide_mode(request_, backend, world, local_world, gpus, launched)
        assert "\n" not in info.value.message and ("dist." in info.value.message or "GPU" in info.value.message)
    else:
        d = decide_mode(request_, backend, world, local_world, gpus, launched)
        assert (d.mode, d.backend, d.use_cuda) == want


def test_impossible_requests_explain_the_fix():
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node"):
        decide_mode("ddp", "auto", 1, 1, 0)
    with pytest.raises(ConfigError, match="dist.mode=single"):
        decide_mode("dp", "auto", 1, 1, 0)
    # 4 processes and 2 GPUs: two ranks per GPU is found by the GPUs' UUIDs once the ranks have
    # joined (tests/test_gpu_placement.py), not refused by counting (srun shows each task one GPU)


def _step(model: nn.Module, replicas_prepare: bool = False) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (8,), generator=g)
    plan = EpochPlan(8, world=1, rank=0, batch_size=8, accum=1, seed=0, epoch=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = Engine(model, opt, Normalize([0.5] * 3, [0.25] * 3), torch.device("cpu"), replicas_prepare=replicas_prepare)
    list(eng.train_steps(iter([(images, labels, torch.full((8,), 1 / 8))]), plan, lambda c: 0.1))
    return model


def test_dataparallel_wrapper_trains_and_writes_canonical_keys():
    torch.manual_seed(0)
    plain = _step(TinyCNN(10, batchnorm=True))
    torch.manual_seed(0)
    dp = wrap(TinyCNN(10, batchnorm=True), ModeDecision("dp", None, True, 2), torch.device("cpu"))
    assert isinstance(dp, nn.DataParallel)
    _step(dp)
    a, b = canonical_state_dict(plain), canonical_state_dict(dp)
    assert list(a) == list(b) and not any(k.startswith("module.") for k in b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_dataparallel_replicas_normalise_their_own_uint8_chunks():
    """DataParallel without GPUs runs its module in place, so this is the CPU twin of the scatter:
    the engine hands the uint8 batch to DataParallel, each replica normalises its chunk, and the
    step equals the plain path's bitwise."""
    norm = Normalize([0.5] * 3, [0.25] * 3)
    seen = []
    torch.manual_seed(0)
    plain = _step(TinyCNN(10, batchnorm=True))
    torch.manual_seed(0)
    dp = wrap(TinyCNN(10, batchnorm=True), ModeDecision("dp", None, True, 2), torch.device("cpu"), prepare=norm)
    dp.module.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    _step(dp, replicas_prepare=True)
    assert seen == [torch.uint8]  # was: float32 normalised on cuda:0, then scattered (4x the bytes)
    a, b = canonical_state_dict(plain), canonical_state_dict(dp)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_user_dp_request_without_gpus_stays_an_error(small_args):
    res = launch(0, *small_args, "dist.mode=dp", timeout=60)
    assert res.returncode == 2 and "needs CUDA GPUs" in res.stderr


@pytest.mark.stacks
def test_debug_mode_is_short_and_leaves_the_real_run_alone(small_args, tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("untouched")
    res = launch(0, "--debug", *small_args, "debug.steps_per_epoch=3", timeout=60)
    assert res.returncode == 0, res.stderr
    assert "debug: one process on cpu, num_workers=0, anomaly detection on, 3 step(s) x 1 epoch(s)" in res.stderr
    assert [p.name for p in run_dir.iterdir()] == ["keep.txt"]
    debug_dir = tmp_path / "run.debug"
    assert (debug_dir / "checkpoints" / "last.pt").exists()
    state = torch.load(debug_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 3
    assert sum("step " in l and "samples" in l for l in res.stderr.splitlines()) == 3  # every step logged


def test_debug_with_fp16_survives_the_grad_scalers_overflow_steps(small_args, tmp_path: Path):
    # the loud model's fp16 gradients overflow at the scaler's first scale: the scaler skips that step
    helpers = ROOT / "tests" / "helpers"
    env = child_env(PYTHONPATH=f"{ROOT}{os.pathsep}{helpers}")
    res = launch(0, "--debug", *small_args, "model.name=loud_model:build", "train.precision=fp16",
                 "debug.steps_per_epoch=4", timeout=60, env=env)
    # was: RuntimeError: Function 'AddmmBackward0' returned nan values (anomaly mode's nan check)
    assert res.returncode == 0, res.stderr
    assert "anomaly detection on (no nan check: fp16)" in res.stderr
    state = torch.load(tmp_path / "run.debug" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 4 and state["scaler"]["scale"] < 65536.0  # an overflow happened and was skipped


_BUILT: list[Trainer] = []


@pytest.fixture(autouse=True)
def _close_trainers():
    """A trainer built here lets go of its output folder and train.log when its test ends."""
    yield
    while _BUILT:
        _BUILT.pop().close()


def _trainer(tmp_path: Path, demo_small: Path, *overrides: str, decision=None) -> Trainer:
    cfg = load(None, [f"data.root={demo_small}", f"output_dir={tmp_path / 'o'}", "model.name=tiny_cnn_bn",
                      "data.image_size=16", "data.batch_size=8", "data.num_workers=0", *overrides])
    dist = Dist(env=LaunchEnv(), backend="gloo" if tdist.is_initialized() else None, device=torch.device("cpu"))
    _BUILT.append(build_trainer(cfg, dist, decision or ModeDecision("single", None, False, 0), stop=StopRequest([])))
    return _BUILT[-1]


def test_bf16_autocast_on_cpu_trains(tmp_path: Path, demo_small: Path):
    t = _trainer(tmp_path, demo_small, "train.precision=bf16", "train.epochs=1")
    seen = []
    conv = unwrap(t.model).features[0]
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = conv.weight.detach().clone()
    res = t.fit()
    assert seen and seen[0] == torch.bfloat16
    assert torch.isfinite(torch.tensor(res.last_val.loss))
    assert not torch.equal(before, conv.weight.detach())


def test_fp16_checkpoints_its_grad_scaler(tmp_path: Path, demo_small: Path):
    t = _trainer(tmp_path, demo_small, "train.precision=fp16", "train.epochs=1")
    assert t.engine.scaler.is_enabled()
    t.fit()
    state = torch.load(tmp_path / "o" / "checkpoints" / "last.pt", weights_only=True)
    assert state["scaler"] is not None and "scale" in state["scaler"]


def test_knobs_have_their_effect(tmp_path: Path, demo_small: Path):
    t = _trainer(tmp_path, demo_small, "train.channels_last=true")
    conv = unwrap(t.model).features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    t.close()  # one run at a time per output_dir: the next build would be refused while this one holds it
    t = _trainer(tmp_path, demo_small, "train.compile=true", "overwrite=true", "resume=none")
    assert type(t.model).__name__ == "OptimizedModule" and isinstance(unwrap(t.model), TinyCNN)


def test_sync_batchnorm_for_ddp_on_gpus_and_a_clear_error_on_cpu():
    from ddp_trainer.launch.mode import prepare

    gpu_ddp = ModeDecision("ddp", "nccl", True, 1)
    m = prepare(TinyCNN(10, batchnorm=True), gpu_ddp, sync_batchnorm=True, channels_last=False)
    kinds = {type(x) for x in m.modules()}
    assert nn.SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds
    single = prepare(TinyCNN(10, batchnorm=True), ModeDecision("single", None, True, 1), sync_batchnorm=True,
                     channels_last=False)
    assert nn.SyncBatchNorm not in {type(x) for x in single.modules()}  # nothing to sync with
    with pytest.raises(ConfigError, match="model.sync_batchnorm=false on CPU"):
        prepare(TinyCNN(10, batchnorm=True), ModeDecision("ddp", "gloo", False, 0), sync_batchnorm=True,
                channels_last=False)
