"""The checks of scripts/gpu_check.sh, one subcommand each: ``python3 scripts/gpu_checks.py CHECK OUT``.

Each check writes what it ran and saw to stdout (the shell script keeps it as OUT/CHECK.log) and ends
with one line ``RESULT <what it measured>``; its exit code says pass (0) or fail (not 0). Without a
GPU, ``--device cpu`` runs the in-process checks on the CPU (a smoke test of this file, not a GPU
check). Imports nothing of CUDA until a check runs, so it imports on any machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddp_trainer.checkpoint.weights import canonical_tensors  # noqa: E402
from ddp_trainer.checkpoint.writer import AsyncCheckpointWriter, CheckpointWriter  # noqa: E402
from ddp_trainer.config import load  # noqa: E402
from ddp_trainer.data.samplers import EpochPlan  # noqa: E402
from ddp_trainer.data.transforms import Normalize  # noqa: E402
from ddp_trainer.launch.dist import Dist  # noqa: E402
from ddp_trainer.launch.mode import ModeDecision  # noqa: E402
from ddp_trainer.launch.signals import StopRequest  # noqa: E402
from ddp_trainer.models import build_model  # noqa: E402
from ddp_trainer.training.build import build_trainer  # noqa: E402
from ddp_trainer.training.engine import Engine  # noqa: E402

PY = sys.executable
# a small, quick run on the demo data (2,000 train / 500 val images, generated on first use)
COMMON = ["data.root=demo", "data.image_size=64", "data.num_workers=4", "train.epochs=1", "model.name=resnet18",
          "train.log_every_steps=5"]


class Failed(Exception):
    """The check failed; the message is its RESULT line."""


def result(text: str) -> None:
    print(f"RESULT {text}", flush=True)


def run(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root, its output appended to ``log`` and returned."""
    print("$", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4"), **(env or {})})
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}\n")
    return res


def torchrun(nproc: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def last_row(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def need(ok: bool, why: str) -> None:
    if not ok:
        raise Failed(why)


# -- the checks --------------------------------------------------------------------------------------

def check_preflight(out: Path, args: argparse.Namespace) -> None:
    """Versions, and the GPUs nvidia-smi lists against the ones torch sees (they must agree)."""
    import torchvision

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
          f"NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else '-'}")
    seen = torch.cuda.device_count()
    names = [torch.cuda.get_device_name(i) for i in range(seen)]
    for i, name in enumerate(names):
        props = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}, "
              f"uuid {props.uuid}")
    need(seen == args.nvidia_smi_gpus, f"nvidia-smi lists {args.nvidia_smi_gpus} GPU(s) but torch sees {seen}: "
                                       f"check CUDA_VISIBLE_DEVICES and that torch is a CUDA build")
    result(f"{seen} x {names[0] if names else '-'}; torch {torch.__version__} (CUDA {torch.version.cuda})")


def check_ddp_features(out: Path, args: argparse.Namespace) -> None:
    """DDP over NCCL, one process, every feature on; two background saves mid-epoch; the timeout lowered."""
    run_dir = out / "run"
    res = run([*torchrun(1), "launch.py", *COMMON, f"output_dir={run_dir}", "dist.mode=ddp", "dist.backend=nccl",
               "train.precision=fp16", "train.grad_accum_steps=2", "train.clip_grad_norm=1.0",
               "train.channels_last=true", "model.sync_batchnorm=true", "train.ema_decay=0.999",
               "data.mixup_alpha=0.2", "checkpoint.every_steps=5", "checkpoint.async=true"], out / "run.log")
    text = res.stdout + res.stderr
    need(res.returncode == 0, f"exit {res.returncode}: {_first_error(text)}")
    need("backend=nccl" in text, "the launch line does not say backend=nccl")
    need("collective timeout lowered to dist.timeout_s" in text, "the collective timeout was not lowered")
    saves = len(re.findall(r"checkpoint: last\.pt \(epoch 0, \d+ samples in\)", text))
    need(saves >= 2, f"{saves} mid-epoch save(s), expected 2 or more")
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    need(state["scaler"] is not None and "model_ema" in state, "the checkpoint lacks the scaler or the EMA")
    row = last_row(run_dir)
    result(f"val_acc={row['val_acc']:.3f} {row['images_per_s']:.0f} img/s, {saves} background saves, timeout lowered")


def check_compile_ddp(out: Path, args: argparse.Namespace) -> None:
    """torch.compile under DDP, with a tail step of another shape (recompiles counted)."""
    run_dir = out / "run"
    res = run([*torchrun(1), "launch.py", *COMMON, f"output_dir={run_dir}", "dist.mode=ddp", "train.compile=true",
               "data.drop_last=false", "train.precision=bf16", "train.channels_last=true"], out / "run.log",
              env={"TORCH_LOGS": "recompiles"})
    text = res.stdout + res.stderr
    need(res.returncode == 0, f"exit {res.returncode}: {_first_error(text)}")
    recompiles = len(re.findall(r"[Rr]ecompiling function", text))
    row = last_row(run_dir)
    result(f"val_acc={row['val_acc']:.3f} {row['images_per_s']:.0f} img/s (first epoch, compile included), "
           f"{recompiles} recompile(s)")


def check_exact_resume(out: Path, args: argparse.Namespace) -> None:
    """Deterministic, a model with dropout (its GPU random stream matters), SIGUSR1 mid-epoch, then
    the same command: the weights equal an uninterrupted run's bit for bit."""
    _exact_resume(out, [])


def check_decode_device_resume(out: Path, args: argparse.Namespace) -> None:
    """exact_resume with data.decode_device=cuda on JPEG files (random resized crops and flips decoded
    on the GPU): the weights after a mid-epoch stop and resume equal an uninterrupted run's bit for bit."""
    data = _jpeg_tree(out / "data", per_class=96, size=(160, 120))
    _exact_resume(out, [f"data.root={data}", "data.val_fraction=0.2", "data.batch_size=8",
                        "data.augment=[random_resized_crop,flip]", "data.decode_device=cuda"])


def _exact_resume(out: Path, extra: list[str]) -> None:
    same = [*COMMON, "model.name=mobilenet_v3_small", "train.epochs=2", "train.deterministic=true",
            "checkpoint.every_steps=4", "train.log_every_steps=1", "dist.mode=single", "data.num_workers=2", *extra]
    ref = out / "uninterrupted"
    res = run([PY, "launch.py", *same, f"output_dir={ref}"], out / "uninterrupted.log")
    need(res.returncode == 0, f"uninterrupted run: exit {res.returncode}: {_first_error(res.stdout + res.stderr)}")
    stopped = out / "stopped"
    cmd = [PY, "launch.py", *same, f"output_dir={stopped}"]
    with open(out / "stopped.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while not _logged_step(stopped, 12):
            need(proc.poll() is None and time.monotonic() - t0 < 300, "the run to stop ended or never got to step 12")
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        rc = proc.wait(300)
    need(rc == 3, f"the stopped run exited {rc}, expected 3 (stopped at a checkpoint)")
    state = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)
    need(not state["epoch_complete"] and state["rng"][0].get("cuda") is not None,
         "the stop checkpoint is not mid-epoch or holds no CUDA generator state")
    res = run(cmd, out / "resumed.log")
    need(res.returncode == 0, f"resumed run: exit {res.returncode}: {_first_error(res.stdout + res.stderr)}")
    a = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)["model"]
    equal = sum(torch.equal(a[k], b[k]) for k in a)
    need(equal == len(a), f"{equal}/{len(a)} tensors equal after the resume")
    result(f"stopped at step {state['step']} ({state['position']} samples into epoch {state['epoch']}); "
           f"{equal}/{len(a)} tensors bitwise equal to the uninterrupted run")


def check_writers(out: Path, args: argparse.Namespace) -> None:
    """The background and the plain writer write the same file from GPU state, and it loads on a
    machine without a GPU (weights_only, no map_location)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model("resnet18", 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 64, 64, device=device)).sum().backward()
    opt.step()
    state = {"format": "ddp_trainer.checkpoint", "format_version": 1, "model": canonical_tensors(model),
             "optimizer": opt.state_dict()}
    CheckpointWriter(out / "sync", 1).save(state)
    writer = AsyncCheckpointWriter(out / "async", 1)
    writer.save(state)
    writer.close()
    files = [torch.load(out / kind / "last.pt", weights_only=True) for kind in ("sync", "async")]
    tensors = [_tensors(f) for f in files]
    need(all(t.device.type == "cpu" for ts in tensors for t in ts), "a file holds tensors that are not on the CPU")
    equal = sum(torch.equal(x, y) for x, y in zip(*tensors))
    need(equal == len(tensors[0]) and files[0]["payload_sha256"] == files[1]["payload_sha256"],
         f"{equal}/{len(tensors[0])} tensors equal between the two writers' files")
    result(f"{equal} tensors equal, both files CPU-only, same checksum")


def check_fp16_scale(out: Path, args: argparse.Namespace) -> None:
    """fp16's grad scaler: saved, and restored on resume."""
    run_dir = out / "run"
    base = [*COMMON, "dist.mode=single", "train.precision=fp16", f"output_dir={run_dir}"]
    res = run([PY, "launch.py", *base], out / "run.log")
    need(res.returncode == 0, f"exit {res.returncode}: {_first_error(res.stdout + res.stderr)}")
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["scaler"]["scale"]
    trainer = _trainer([*base, "train.epochs=2", "resume=auto"], torch.device("cuda", 0))
    try:
        restored = trainer.engine.scaler.get_scale()
    finally:
        trainer.close()
    need(restored == saved, f"scale {saved} saved, {restored} after the resume")
    result(f"scale {saved:g} saved and restored")


def check_syncs(out: Path, args: argparse.Namespace) -> None:
    """Host-device syncs during training steps (bf16: no grad scaler; steps between log lines), caught
    by torch.cuda.set_sync_debug_mode("warn")."""
    device = torch.device(args.device)
    trainer = _trainer([*COMMON, "dist.mode=single", "train.precision=bf16", "train.channels_last=true",
                        "train.ema_decay=0.999", f"output_dir={out / 'run'}", "train.log_every_steps=1000"], device)
    try:
        n = len(trainer.data.train_set)
        plan = EpochPlan(n, world=1, rank=0, batch_size=64, accum=1, seed=0, epoch=0, max_steps=12)
        batches = trainer.data.train_batches(plan)
        steps = trainer.engine.train_steps(batches, plan, lambda consumed: 1e-3)
        for _ in range(4):  # warm-up: first allocations, cuDNN's choice of kernels
            next(steps)
            trainer.ema.update(trainer.model)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in steps:
                trainer.ema.update(trainer.model)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    finally:
        trainer.close()
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    for s in sorted(set(syncs)):
        print("sync:", s)
    need(not syncs, f"{len(syncs)} host-device sync(s) in 8 steps (see the log)")
    result("0 host-device syncs in 8 training steps (bf16, channels_last, EMA)")


def check_commands(out: Path, args: argparse.Namespace) -> None:
    """--debug, the decoded cache, evaluate and predict, on the GPU."""
    res = run([PY, "launch.py", "--debug", *COMMON, f"output_dir={out / 'debug'}"], out / "debug.log")
    need(res.returncode == 0 and "debug: one process on cuda" in res.stderr, f"--debug: exit {res.returncode}: "
                                                                            f"{_first_error(res.stderr)}")
    run_dir = out / "cached"
    res = run([PY, "launch.py", *COMMON, "dist.mode=single", "data.cache=decoded", f"data.cache_dir={out / 'cache'}",
               f"output_dir={run_dir}"], out / "cached.log")
    need(res.returncode == 0, f"data.cache=decoded: exit {res.returncode}: {_first_error(res.stderr)}")
    row = last_row(run_dir)
    ck = run_dir / "checkpoints" / "last.pt"
    res = run([PY, "-m", "ddp_trainer", "evaluate", "--checkpoint", str(ck), "--json"], out / "evaluate.log")
    need(res.returncode == 0, f"evaluate: exit {res.returncode}: {_first_error(res.stderr)}")
    evaluated = json.loads(res.stdout.strip().splitlines()[-1])
    # evaluate decodes the files, the run validated on the cache: the same pixels, so the same figure
    need(abs(evaluated["val_acc"] - row["val_acc"]) < 1e-9, f"evaluate val_acc {evaluated['val_acc']} differs "
                                                           f"from the run's {row['val_acc']}")
    demo = Path(os.environ.get("DDP_TRAINER_CACHE", Path.home() / ".cache" / "ddp_trainer")) / "demo-v2" / "val"
    images = sorted(demo.glob("*/00000.png"))[:3]
    res = run([PY, "-m", "ddp_trainer", "predict", "--checkpoint", str(ck), *map(str, images)], out / "predict.log")
    need(res.returncode == 0 and len(res.stdout.strip().splitlines()) == len(images), f"predict: exit {res.returncode}")
    result(f"--debug ok; cached run val_acc={row['val_acc']:.3f} {row['images_per_s']:.0f} img/s; evaluate equal; "
           f"predict named {len(images)} images")


def check_throughput(out: Path, args: argparse.Namespace) -> None:
    """Training images/s of resnet50 on synthetic 224 px batches already on the GPU (warm-up left
    out): fp32 (TF32) and bf16 + channels_last, against the GPU's measured matmul ceiling."""
    device = torch.device(args.device)
    ceiling = {dtype: _matmul_tflops(device, dtype) for dtype in (torch.float32, torch.bfloat16)}
    print(f"matmul ceiling: fp32 (TF32) {ceiling[torch.float32]:.0f} TFLOP/s, bf16 {ceiling[torch.bfloat16]:.0f} TFLOP/s")
    flops_per_image = 3 * 2 * 4.1e9  # forward + backward of resnet50 at 224 px: about 3 x 4.1 GMAC x 2
    figures = []
    for precision, channels_last, dtype in (("fp32", False, torch.float32), ("bf16", True, torch.bfloat16)):
        rate = _images_per_s(device, precision, channels_last, batch=args.batch, steps=args.steps)
        tflops = rate * flops_per_image / 1e12
        figures.append(f"{precision}{'+channels_last' if channels_last else ''} {rate:.0f} img/s "
                       f"({tflops:.0f} TFLOP/s, {tflops / ceiling[dtype]:.0%} of the matmul ceiling)")
        print(figures[-1], flush=True)
    result("; ".join(figures))


def check_decode_device(out: Path, args: argparse.Namespace) -> None:
    """data.decode_device=cuda's device half (ddp_trainer/data/device_decode.py) on real JPEGs: the
    batch decoded by nvJPEG, cropped, resized and flipped on the GPU against the CPU path's pixels
    (tolerance: a mean difference of at most DECODE_TOLERANCE per channel value in every image: nvJPEG's
    IDCT and chroma upsampling are not libjpeg-turbo's), whether two decodes of one batch are bitwise
    equal (the condition of an exact resume), and the images/s of the device decode against one CPU
    core's decode of the same samples."""
    from ddp_trainer.data.datasets import FolderDataset
    from ddp_trainer.data.device_decode import DeviceDecodeDataset, assemble, collate, jpeg_batch_decoder
    from ddp_trainer.data.folder_index import scan
    from ddp_trainer.data.samplers import SampleKey
    from ddp_trainer.data.transforms import ImageTransform
    from PIL import Image
    device = torch.device(args.device)
    _jpeg_tree(out / "data", per_class=32)
    Image.new("RGB", (300, 200), (200, 40, 40)).save(out / "data" / "b" / "drawn.png")  # decoded in the worker
    idx = scan(out / "data")
    transform = ImageTransform(224, ("random_resized_crop", "flip"))
    cpu = FolderDataset(idx, transform, seed=1)
    keys = [SampleKey(i, 0, 1.0, 0) for i in range(len(idx))]
    images, _, _ = collate([DeviceDecodeDataset(cpu)[k] for k in keys])
    decoder = jpeg_batch_decoder(device)
    t0 = time.perf_counter()
    expected = torch.stack([cpu[k][0] for k in keys])
    cpu_rate = len(keys) / (time.perf_counter() - t0)
    batch = assemble(images, transform, decoder, device)
    diff = (batch.cpu().int() - expected.int()).abs().float().flatten(1).mean(1)
    print(f"mean |GPU - CPU| per image: max {diff.max():.2f}, mean {diff.mean():.2f} (tolerance {DECODE_TOLERANCE})")
    need(float(diff.max()) <= DECODE_TOLERANCE, f"GPU-decoded pixels differ from the CPU's by {diff.max():.2f} "
         f"on average in one image (tolerance {DECODE_TOLERANCE})")
    exact = torch.equal(assemble(images, transform, decoder, device), batch)
    for _ in range(2):
        assemble(images, transform, decoder, device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps // 3 or 1):
        assemble(images, transform, decoder, device)
    _sync(device)
    rate = len(keys) * (args.steps // 3 or 1) / (time.perf_counter() - t0)
    result(f"pixels within {diff.max():.2f} of the CPU's (mean {diff.mean():.2f}; tolerance {DECODE_TOLERANCE}); "
           f"repeat decodes {'bitwise equal' if exact else 'NOT bitwise equal: decode_device=cuda runs are not exact'}; "
           f"{rate:.0f} img/s on {device.type} vs {cpu_rate:.0f} img/s on one CPU core (500x375 -> 224 px)")


def check_decode_device_throughput(out: Path, args: argparse.Namespace) -> None:
    """resnet50 at 224 px, bf16 + channels_last, on data-bound files (500x375 JPEGs, random resized
    crops and flips) with 4 loader workers: images/s with data.decode_device=cuda against cpu, and
    both against the compute ceiling (the same model on batches already on the GPU, as throughput
    measures it). Target: cuda within 10% of the ceiling."""
    data = _jpeg_tree(out / "data", per_class=1024)
    common = [f"data.root={data}", "data.val_fraction=0.05", "model.name=resnet50", "data.image_size=224",
              "data.batch_size=128", "data.num_workers=4", "data.augment=[random_resized_crop,flip]",
              "train.precision=bf16", "train.channels_last=true", "train.epochs=2", "dist.mode=single",
              "log.progress=off", "checkpoint.every_epochs=0"]
    rates = {}
    for where in ("cpu", "cuda"):
        run_dir = out / where
        res = run([PY, "launch.py", *common, f"data.decode_device={where}", f"output_dir={run_dir}"],
                  out / f"{where}.log", timeout=200)
        need(res.returncode == 0, f"decode_device={where}: exit {res.returncode}: {_first_error(res.stdout + res.stderr)}")
        rates[where] = last_row(run_dir)["images_per_s"]  # the second epoch's: warm workers, tuned kernels
        print(f"decode_device={where}: {rates[where]:.0f} img/s", flush=True)
    ceiling = _images_per_s(torch.device(args.device), "bf16", True, batch=128, steps=args.steps)
    print(f"compute ceiling (batches already on the GPU): {ceiling:.0f} img/s", flush=True)
    line = (f"decode_device=cuda {rates['cuda']:.0f} img/s ({rates['cuda'] / ceiling:.0%} of the ceiling {ceiling:.0f}), "
            f"cpu {rates['cpu']:.0f} img/s ({rates['cpu'] / ceiling:.0%}); cuda/cpu {rates['cuda'] / rates['cpu']:.2f}x")
    need(rates["cuda"] >= 0.9 * ceiling, f"{line}: cuda is not within 10% of the ceiling")
    result(line)


def _jpeg_tree(root: Path, per_class: int, size: tuple[int, int] = (500, 375)) -> Path:
    """Two class folders of photo-like JPEGs (smooth light, texture and grain; quality 90) under
    ``root``, written once (a second call finds them)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            if (root / c / f"{i}.jpg").exists():
                continue
            small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
            pic = np.asarray(Image.fromarray(small).resize(size, Image.BICUBIC), dtype=np.float64)
            pic += rng.normal(0, 8, pic.shape)
            Image.fromarray(pic.clip(0, 255).astype(np.uint8)).save(root / c / f"{i}.jpg", quality=90)
    return root


DECODE_TOLERANCE = 3.0  # mean |difference| per channel value (0-255) of one image, GPU decode vs CPU decode


# -- helpers -----------------------------------------------------------------------------------------

def _first_error(text: str) -> str:
    lines = [l for l in text.splitlines() if "error" in l.lower()]
    return (lines[0] if lines else (text.strip().splitlines() or ["no output"])[-1])[:300]


def _logged_step(run_dir: Path, step: int) -> bool:
    log = run_dir / "train.log"
    return log.exists() and f" step {step}:" in log.read_text(errors="replace")


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _trainer(overrides: list[str], device: torch.device):
    cfg = load(None, overrides)
    decision = ModeDecision("single", None, device.type == "cuda", int(device.type == "cuda"))
    return build_trainer(cfg, Dist.single(device), decision, stop=StopRequest([]))


def _matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    if device.type != "cuda":
        n, repeats = 512, 3
    torch.backends.cuda.matmul.allow_tf32 = True
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e12


def _images_per_s(device: torch.device, precision: str, channels_last: bool, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    model = build_model("resnet50", 1000).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = Engine(model, opt, Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).to(device), device,
                    precision, channels_last=channels_last)
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device, generator=g)
    labels = torch.randint(0, 1000, (batch,), device=device, generator=g)
    weights = torch.full((batch,), 1.0 / batch, device=device)
    warmup = max(3, steps // 4)
    plan = EpochPlan(batch * (warmup + steps), world=1, rank=0, batch_size=batch, accum=1, seed=0, epoch=0)
    done = engine.train_steps(iter(lambda: (images, labels, weights), None), plan, lambda consumed: 0.1)
    for _ in range(warmup):
        next(done)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(done)
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("check", choices=sorted(CHECKS))
    p.add_argument("out", type=Path, help="this check's folder (runs, files)")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the in-process checks")
    p.add_argument("--nvidia-smi-gpus", type=int, default=0)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        CHECKS[args.check](args.out, args)
    except Failed as exc:
        result(str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
