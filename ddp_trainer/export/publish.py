"""Writing an export: made from a checkpoint, checked against its PyTorch model, and only then
written, atomically (a refused or failed export leaves nothing at OUT, nor a temporary file)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..checkpoint.format import Checkpoint
from ..config import Config
from ..errors import show_path
from ..fsutil import atomic_write, human_bytes
from .artifact import EXPORTERS, Exported, export_checked
from .source import check_images, load_source, model_inputs


@dataclass(frozen=True)
class ExportRequest:
    """What ``ddp-trainer export`` was asked for (validated by the command line)."""

    fmt: str  # "onnx" | "exported"
    ema: bool = False
    batch: int | None = None  # None: a dynamic batch dimension
    preprocess: bool = False
    opset: int | None = None  # None: the exporter's default
    check: int = 64  # images the export is checked on


def export_checkpoint(loaded: Checkpoint, cfg: Config, name: str, out: Path, request: ExportRequest,
                      say: Callable[[str], None] = print) -> Exported:
    """Export ``loaded`` (built as model ``name``, its input side from ``cfg.data``), check it on
    ``request.check`` images (see :func:`.artifact.export_checked`) and write it to ``out``."""
    source = load_source(loaded, cfg, name, ema=request.ema, preprocess=request.preprocess)
    images, where = check_images(cfg.data, request.check, cfg.seed)
    size = cfg.data.image_size
    batch = "dynamic" if request.batch is None else request.batch
    say(f"export: {name} from '{show_path(loaded.path)}' ({'EMA' if request.ema else 'model'} weights, "
        f"{len(source.classes)} classes), input {'uint8 pixels' if request.preprocess else 'normalised float32'} "
        f"({batch}, 3, {size}, {size}), checked on {where}")
    start = time.perf_counter()
    result = export_checked(source.model, model_inputs(source, images), fmt=request.fmt, batch=request.batch,
                            opset=request.opset, metadata={**source.metadata, "batch": json.dumps(batch)}, say=say)
    took = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        f.write(result.data)
    say(f"wrote {show_path(out)} ({human_bytes(len(result.data))}, {request.fmt}) by {EXPORTERS[result.exporter]}, "
        f"exported and checked in {took:.1f} s")
    return result
