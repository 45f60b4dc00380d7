"""Per-sample and per-batch randomness draws from its own seeds and leaves every global generator
as it was: the CPU's (restored) and each GPU's (never touched: DataParallel replicas and the saved
CUDA states depend on them)."""
import torch

from ddp_trainer.data.mixing import BatchMixer
from ddp_trainer.data.transforms import ImageTransform


def test_augmentation_and_mixing_never_reseed_the_gpu_generators(monkeypatch):
    seeded = []
    # torch.manual_seed reaches every GPU's generator through this call (queued when CUDA is not
    # initialised, as here): record it instead
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    cpu_before = torch.get_rng_state()
    img = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    tf = ImageTransform(16, ("random_resized_crop", "flip", "trivialaugment", "random_erasing"), erasing_p=1.0)
    out = [tf(img, torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])  # reproducible from the sample's seed
    mixer = BatchMixer(4, 0.2, 1.0, seed=3, rank=0)
    batch = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(6) % 4
    a, b = mixer(batch, labels, 7, 0), mixer(batch, labels, 7, 0)
    assert torch.equal(a[1], b[1])
    assert seeded == []  # was: one reseed of every GPU per augmented image and per mixed micro-batch
    assert torch.equal(torch.get_rng_state(), cpu_before)


def test_deterministic_is_strict_and_fixes_the_cublas_workspace(monkeypatch):
    from ddp_trainer.config import load
    from ddp_trainer.errors import ConfigError
    from ddp_trainer.training.build import apply_numerics

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # records the value before, so teardown restores it
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32)
    try:
        apply_numerics(load(None, ["train.deterministic=true"]), torch.device("cpu"))
        # was: warn_only=True and no workspace setting: non-deterministic GPU kernels ran silently
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        apply_numerics(load(None, ["train.deterministic=warn"]), torch.device("cpu"))
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32 = cudnn
    try:
        load(None, ["train.deterministic=sometimes"])
    except ConfigError as exc:
        assert "train.deterministic" in exc.message and "warn" in exc.message
    else:
        raise AssertionError("train.deterministic=sometimes was accepted")


def test_dataparallel_saves_and_restores_every_gpus_generator(monkeypatch):
    """No GPU here: CUDA's generator functions are replaced by a record of what is asked of which
    GPU (the GPU check runs the real ones)."""
    from ddp_trainer.checkpoint.format import Checkpoint
    from ddp_trainer.checkpoint.registry import LoadContext, SaveContext
    from ddp_trainer.launch.dist import Dist
    from ddp_trainer.training.components import RngState

    gpus = {0: torch.tensor([10]), 1: torch.tensor([11]), 2: torch.tensor([12])}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda i: gpus[i].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, i: gpus.__setitem__(i, state.clone()))
    rng = RngState(Dist.single(), seed=0, gpus=[0, 1, 2])  # DataParallel over three GPUs
    saved = rng.save(SaveContext())
    (mine,) = saved["rng"]
    # was: {"torch", "cuda": GPU 0's only}: the replicas on GPUs 1 and 2 restarted their streams
    assert [int(t) for t in mine["cuda_devices"]] == [10, 11, 12] and int(mine["cuda"]) == 10
    for i in gpus:
        gpus[i] = torch.tensor([0])
    rng.load(saved, LoadContext(Checkpoint("x.pt", "ddp_trainer", {**saved, "step": 5})))
    assert {i: int(t) for i, t in gpus.items()} == {0: 10, 1: 11, 2: 12}


def test_tf32_is_a_gpu_setting():
    from ddp_trainer.config import load
    from ddp_trainer.training.build import apply_numerics

    before = torch.get_float32_matmul_precision()
    try:
        apply_numerics(load(None, []), torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == before  # the CPU keeps torch's default
        apply_numerics(load(None, []), torch.device("cuda", 0))  # flags only: no GPU is touched
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        apply_numerics(load(None, ["train.tf32=false"]), torch.device("cuda", 0))
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False
