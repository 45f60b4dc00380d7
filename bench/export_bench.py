"""Export time, and images/s of the exported ONNX file in ONNX Runtime against eager PyTorch, on the
CPU (issue 32). Prints every figure and the ratios; asserts nothing.

    python bench/export_bench.py [--models resnet18:64,mobilenet_v3_small:64,...] [--batch 8]
                                 [--seconds 3] [--threads 1] [--check 16]

Each model (NAME:SIDE, 10 classes) gets random weights whose BatchNorm statistics are those of random
images and no all-zero classifier (a fresh model's logits are about 1e-10, or 0: nothing to
compare), then goes through the product's
own path, ``ddp_trainer.export.artifact.export_checked`` (the dynamo exporter first, the
TorchScript-based one where that raises or fails the check; checked on --check random images at a
dynamic batch): the exporter it used, the export + check time, the check's figures. Then eager
PyTorch (``torch.inference_mode``, fp32) and ONNX Runtime (CPU provider, the same thread count) each
run batches of --batch for about --seconds, alternately twice; the better round of each counts.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddp_trainer.errors import ExportError  # noqa: E402
from ddp_trainer.export.artifact import EXPORTERS, INPUT, OUTPUT, export_checked, require, session_options  # noqa: E402
from ddp_trainer.models import build_model  # noqa: E402

DEFAULT = "tiny_cnn_bn:32,resnet18:64,mobilenet_v3_small:64,resnet50:64,convnext_tiny:64,vit_b_16:224"


def calibrated(name: str, side: int) -> torch.nn.Module:
    model = build_model(name, 10)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # the plain mean over the calibration batch
            m.reset_running_stats()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():  # a zero-initialised head (vit_b_16's) gives all-zero logits: nothing to check
            if isinstance(m, torch.nn.Linear) and not m.weight.any():
                m.weight.normal_(0, 0.02, generator=gen)
        model.train()(torch.randn(16, 3, side, side, generator=gen))
    return model.eval()


def rate(run, x: np.ndarray, seconds: float) -> float:
    """Images/s of ``run(x)`` over about ``seconds`` (after one warm-up call)."""
    run(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(x)
        n += len(x)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=DEFAULT)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--check", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ort = require("onnxruntime", "bench/export_bench.py")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} thread(s), batch {args.batch}")
    rows = []
    for spec in args.models.split(","):
        name, side = spec.split(":")[0], int(spec.split(":")[1])
        model = calibrated(name, side)
        gen = torch.Generator().manual_seed(1)
        inputs = torch.randn(args.check, 3, side, side, generator=gen).numpy()
        start = time.perf_counter()
        try:
            result = export_checked(model, inputs, fmt="onnx", batch=None, opset=None, metadata={},
                                    say=lambda line: print(f"  {name}: {line}"))
        except ExportError as exc:
            print(f"{name}@{side}: {exc.message}")
            rows.append((name, side, "refused", time.perf_counter() - start, None, None))
            continue
        took = time.perf_counter() - start
        session = ort.InferenceSession(result.data, sess_options=session_options(ort), providers=["CPUExecutionProvider"])
        x = torch.randn(args.batch, 3, side, side, generator=gen)
        xn = x.numpy()

        def eager(_: np.ndarray) -> None:
            with torch.inference_mode():
                model(x)

        def onnx(arr: np.ndarray) -> None:
            session.run([OUTPUT], {INPUT: arr})

        best_eager = best_ort = 0.0
        for _ in range(2):  # alternately, so a neighbour's load falls on both
            best_eager = max(best_eager, rate(eager, xn, args.seconds))
            best_ort = max(best_ort, rate(onnx, xn, args.seconds))
        rows.append((name, side, result.exporter, took, best_eager, best_ort))
        print(f"{name}@{side}: {EXPORTERS[result.exporter]}, export + check {took:.1f} s "
              f"({len(result.data) / 1e6:.1f} MB); eager {best_eager:.1f} img/s, ONNX Runtime {best_ort:.1f} img/s, "
              f"ratio {best_ort / best_eager:.2f}")
    print("\n| model | side | exporter | export + check (s) | eager img/s | ONNX Runtime img/s | ORT / eager |")
    print("|---|---|---|---|---|---|---|")
    for name, side, exporter, took, e, o in rows:
        figures = f"{e:.1f} | {o:.1f} | {o / e:.2f}" if e else "- | - | -"
        print(f"| {name} | {side} | {exporter} | {took:.1f} | {figures} |")


if __name__ == "__main__":
    main()
