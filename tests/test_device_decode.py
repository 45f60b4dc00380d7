"""data.decode_device=cuda's CPU-testable half (ddp_trainer/data/device_decode.py): workers read bytes
and draw each JPEG's box and flip as the CPU path does; the training process decodes the batch and
assembles it with the worker-decoded files. The batch decoder on the CPU stands in for nvJPEG, so the
only lines not run here are the device's own decode calls (scripts/gpu_checks.py runs those)."""
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddp_trainer.data.datasets import FolderDataset
from ddp_trainer.data.device_decode import (DeferredJPEG, DeviceDecodeDataset, assemble, check_decode_device,
                                            collate, draw, jpeg_batch_decoder)
from ddp_trainer.data.folder_index import scan
from ddp_trainer.data.samplers import SampleKey
from ddp_trainer.data.transforms import ImageTransform, sample_seed
from ddp_trainer.errors import ConfigError


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """JPEG photos of both orientations, a grayscale JPEG, a PNG, a CMYK JPEG and an EXIF-turned one."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(5)

    def picture(w: int, h: int) -> Image.Image:
        small = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        return Image.fromarray(small).resize((w, h), Image.BICUBIC)

    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(4):
            picture(*((120, 90) if i % 2 else (90, 120))).save(root / c / f"{i}.jpg", quality=90)
    picture(100, 80).convert("L").save(root / "a" / "grey.jpg", quality=90)
    picture(100, 80).save(root / "b" / "drawn.png")
    picture(100, 80).convert("CMYK").save(root / "b" / "cmyk.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    picture(120, 90).save(root / "b" / "turned.jpg", quality=90, exif=exif)
    return root


TRAIN = ImageTransform(32, ("random_resized_crop", "flip"))


def _keys(n: int, epoch: int = 2) -> list[SampleKey]:
    return [SampleKey(i, epoch, 1.0, 0) for i in range(n)]


def test_workers_return_bytes_for_still_jpegs_and_pixels_for_the_rest(mixed):
    idx = scan(mixed)
    ds = DeviceDecodeDataset(FolderDataset(idx, TRAIN, seed=3))
    kinds = {}
    for key in _keys(len(idx)):
        image, label, weight = ds[key]
        assert label == idx.label(key.index) and weight == 1.0
        kinds[idx.rel(key.index)] = type(image)
        if isinstance(image, DeferredJPEG):
            assert bytes(image.encoded.numpy()) == idx.read(key.index)  # the file's bytes, untouched
        else:
            assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    deferred = {rel for rel, kind in kinds.items() if kind is DeferredJPEG}
    assert deferred == {f"{c}/{i}.jpg" for c in "ab" for i in range(4)} | {"a/grey.jpg"}
    assert set(kinds) - deferred == {"b/drawn.png", "b/cmyk.jpg", "b/turned.jpg"}


def test_box_and_flip_are_the_cpu_paths_draws(mixed):
    """The drawn box and flip are those the CPU path draws from the same generator, for every sample
    over several epochs (both flips and both orientations occur)."""
    idx = scan(mixed)
    ds = DeviceDecodeDataset(FolderDataset(idx, TRAIN, seed=3))
    flips = set()
    for epoch in range(4):
        for key in _keys(len(idx), epoch):
            image = ds[key][0]
            if not isinstance(image, DeferredJPEG):
                continue
            with Image.open(io.BytesIO(idx.read(key.index))) as probe:
                width, height = probe.size
            gen = torch.Generator().manual_seed(sample_seed(3, epoch, key.index))
            box = TRAIN.crop_box(height, width, gen)  # the CPU path's order: the box, then the flip
            flip = torch.rand(1, generator=gen).item() < 0.5
            assert (image.box, image.flip) == (box, flip)
            flips.add(flip)
    assert flips == {True, False}


BATCH_LIBRARIES = ["torchvision", pytest.param("torchcodec", marks=pytest.mark.skipif(
    not importlib.util.find_spec("torchcodec"), reason="torchcodec is not installed (the torchcodec extra)"))]


@pytest.mark.parametrize("library", BATCH_LIBRARIES)
def test_the_assembled_batch_is_the_cpu_paths_batch(mixed, library):
    """A batch of JPEGs and PNG/CMYK/turned files, collated and assembled with the CPU batch decoder
    (each library's) standing in for the GPU's, equals bitwise the CPU path's batch (full decode:
    data.reduced_decode is a CPU-only shortcut), in the same order; for training and for
    validation's fit geometry."""
    idx = scan(mixed)
    for transform in (TRAIN, ImageTransform(32, ("flip",)), ImageTransform(32, (), resize=40)):
        cpu = FolderDataset(idx, transform, seed=7)
        device = DeviceDecodeDataset(cpu)
        keys = _keys(len(idx), epoch=1)
        images, labels, weights = collate([device[k] for k in keys])
        assert any(isinstance(x, DeferredJPEG) for x in images) and any(torch.is_tensor(x) for x in images)
        batch = assemble(images, transform, jpeg_batch_decoder("cpu", library), "cpu")
        expected = torch.stack([cpu[k][0] for k in keys])
        assert batch.dtype == torch.uint8 and batch.shape == (len(idx), 3, 32, 32)
        assert torch.equal(batch, expected)
        assert labels.tolist() == [idx.label(k.index) for k in keys] and weights.tolist() == [1.0] * len(keys)


def test_transforms_that_need_the_picture_decode_in_the_worker(mixed):
    idx = scan(mixed)
    transform = ImageTransform(32, ("random_resized_crop", "flip", "random_erasing"))
    cpu = FolderDataset(idx, transform, seed=1)
    ds = DeviceDecodeDataset(cpu)
    key = SampleKey(0, 0, 1.0, 0)
    assert torch.equal(ds[key][0], cpu[key][0])


def test_draw_without_a_generator_is_the_fit_unflipped():
    assert draw(ImageTransform(32, ()), 50, 60, None) == (None, False)


def test_decode_device_errors_are_one_line():
    check_decode_device("cpu")
    with pytest.raises(ConfigError, match=r"data.decode_device='gpu' is not a device; use cpu or cuda"):
        check_decode_device("gpu")
    if torch.cuda.is_available():
        check_decode_device("cuda")
    else:
        with pytest.raises(ConfigError) as caught:
            check_decode_device("cuda")
        assert "\n" not in str(caught.value) and "set data.decode_device=cpu" in str(caught.value)


def test_the_gpu_checks_decode_device_check_runs_on_the_cpu(tmp_path):
    """scripts/gpu_checks.py decode_device with --device cpu (a smoke test of the GPU check's code):
    the CPU batch decoder's pixels equal the CPU path's, and repeat decodes are bitwise equal."""
    import subprocess
    import sys
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_checks.py"
    res = subprocess.run([sys.executable, str(script), "decode_device", str(tmp_path), "--device", "cpu",
                          "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")][-1]
    assert "pixels within 0.00 of the CPU's" in line and "repeat decodes bitwise equal" in line


def test_loader_workers_send_bytes_and_the_batches_equal_the_cpu_loaders(mixed):
    """Through a real DataLoader with two worker processes: the device path's batches (bytes from the
    workers, decoded and assembled in this process) equal the CPU path's batches bitwise."""
    import signal

    from torch.utils.data import DataLoader

    from ddp_trainer.data.device_decode import device_batches
    from ddp_trainer.data.workers import start_method
    sigchld = signal.getsignal(signal.SIGCHLD)  # torch's first loader with workers sets a handler for good
    try:
        _compare_loaders(mixed, DataLoader, device_batches, start_method(2))
    finally:
        signal.signal(signal.SIGCHLD, sigchld)


def _compare_loaders(mixed, DataLoader, device_batches, context):
    idx = scan(mixed)
    cpu = FolderDataset(idx, TRAIN, seed=11)
    keys = _keys(len(idx), epoch=3)
    loader = DataLoader(DeviceDecodeDataset(cpu), batch_size=5, sampler=keys, num_workers=2, collate_fn=collate,
                        multiprocessing_context=context)
    got = list(device_batches(loader, TRAIN, jpeg_batch_decoder("cpu"), "cpu"))
    plain = list(DataLoader(cpu, batch_size=5, sampler=keys, num_workers=0))
    assert len(got) == len(plain) == -(-len(idx) // 5)
    for (images, labels, weights), (want, want_labels, want_weights) in zip(got, plain):
        assert torch.equal(images, want) and torch.equal(labels, want_labels)
        assert torch.allclose(weights, want_weights.float())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: scripts/gpu_check.sh's decode_device runs")
def test_a_run_with_decode_device_cuda_without_cuda_is_one_line_and_exit_2(mixed, tmp_path):
    from conftest import PY, ROOT, run
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    for c in ("a", "b"):
        (data / "train" / c).symlink_to(mixed / c)
    res = run([PY, str(ROOT / "launch.py"), f"data.root={data}", f"output_dir={tmp_path / 'run'}",
               "data.decode_device=cuda", "data.val_fraction=0.5", "data.num_workers=0", "train.epochs=1",
               "model.name=tiny_cnn_bn", "data.image_size=16", "data.batch_size=4"])
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: data.decode_device=cuda: this machine has no CUDA device "
                      "(torch.cuda.is_available() is False); set data.decode_device=cpu"]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # refused before a step ran


def test_a_runs_training_batches_are_the_cpu_paths_with_the_cpu_decoder_standing_in(mixed, tmp_path, monkeypatch):
    """build_run_data with data.decode_device=cuda, the CUDA check let through and the run on the CPU
    (so the CPU batch decoder stands in for nvJPEG): the epoch's batches through real loader workers
    equal data.decode_device=cpu's bitwise. The only lines this leaves to scripts/gpu_check.sh are the
    check's CUDA test and the device's own decode calls."""
    import signal

    from ddp_trainer.config import load
    from ddp_trainer.data import device_decode
    from ddp_trainer.data.datasets import scan_splits
    from ddp_trainer.data.loaders import build_run_data, sampler_spec
    from ddp_trainer.data.samplers import EpochPlan
    from ddp_trainer.launch.dist import Dist

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    for c in ("a", "b"):
        (data / "train" / c).symlink_to(mixed / c)
    monkeypatch.setattr(device_decode, "check_decode_device", lambda value, run_device=None: None)
    sigchld = signal.getsignal(signal.SIGCHLD)  # torch's first loader with workers sets a handler for good
    epochs = {}
    try:
        for where in ("cpu", "cuda"):
            cfg = load(None, [f"data.root={data}", "data.val_fraction=0.3", "data.image_size=32", "data.num_workers=1",
                              "data.batch_size=3", "data.augment=[random_resized_crop,flip]", "data.reduced_decode=false",
                              "data.index_cache=false", f"data.decode_device={where}"])
            splits = scan_splits(cfg.data, data)
            run_data = build_run_data(cfg, Dist.single(), splits, sampler_spec(cfg.data, splits.train),
                                      worker_init_fn=None, before_fork=lambda: None)
            try:
                assert (run_data.decode_on is not None) == (where == "cuda")
                plan = EpochPlan(len(splits.train), world=1, rank=0, batch_size=3, accum=1, seed=cfg.seed, epoch=1)
                epochs[where] = list(run_data.train_batches(plan))
            finally:
                run_data.close()
    finally:
        signal.signal(signal.SIGCHLD, sigchld)
    assert len(epochs["cpu"]) == len(epochs["cuda"]) > 1
    for (images, labels, weights), (want, want_labels, want_weights) in zip(epochs["cuda"], epochs["cpu"]):
        assert torch.equal(images, want) and torch.equal(labels, want_labels) and torch.equal(weights, want_weights)
