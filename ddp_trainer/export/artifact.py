"""From an eval-mode model to the bytes of a deployable file, checked against the model first.

Formats: ``onnx`` (for ONNX Runtime; made by torch's dynamo exporter, or, where that one raises or
its result fails the check, by the TorchScript-based one) and ``exported`` (a torch.export program:
the ``.pt2`` that ``torch.export.load`` reads). Nothing here writes a file: :func:`export_checked`
returns the bytes of an export that passed :func:`compare`, or raises ExportError with the figures.

Every file has one input named ``input`` (N, 3, H, W) and one output named ``logits`` (N, classes).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..extras import optional

RTOL = 1e-4  # the check's tolerance, relative to the largest logit (see Verdict)
INPUT, OUTPUT = "input", "logits"
PT2_METADATA = "ddp_trainer.json"  # the .pt2's extra file holding the metadata
EXPORTERS = {
    "dynamo": "the dynamo exporter (torch.onnx.export dynamo=True)",
    "torchscript": "the TorchScript-based exporter (torch.onnx.export dynamo=False)",
    "torch.export": "torch.export.export",
}
FORMATS = {"onnx": ("dynamo", "torchscript"), "exported": ("torch.export",)}  # tried in this order
PACKAGES = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "exported": ()}


def require(module: str, wanted_by: str = "ddp-trainer export") -> ModuleType:
    """``import module`` (an ``export`` extra package), or a one-line ConfigError naming the install."""
    return optional(module, wanted_by, "export")


def session_options(ort: ModuleType) -> object:
    """ONNX Runtime on as many threads as torch uses here (OMP_NUM_THREADS), so that a comparison
    of the two runs both on the same cores."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    return opts


@dataclass(frozen=True)
class Verdict:
    """How an export's logits compare with the PyTorch model's on the same inputs.

    The rule: accepted when ``max_diff <= RTOL * max(1, scale)`` (the largest absolute logit
    difference, against 1e-4 of the largest absolute PyTorch logit, or 1e-4 absolute where logits
    are smaller than 1) and the top-1 class is the same on every image, except on images whose two
    best PyTorch logits are within that tolerance of each other (``ties``: fp32 arithmetic cannot
    order them, so neither order is wrong)."""

    count: int
    max_diff: float
    scale: float  # the largest |logit| of the PyTorch model
    agree: int  # images with the same top-1
    ties: int  # images with another top-1 whose PyTorch logits were within the tolerance
    flat: bool = False  # every image's PyTorch logits lie within the tolerance of each other

    @property
    def tolerance(self) -> float:
        return RTOL * max(1.0, self.scale)

    @property
    def ok(self) -> bool:
        return bool(self.max_diff <= self.tolerance) and self.agree + self.ties == self.count

    def text(self) -> str:
        ties = f" (+{self.ties} near-ties)" if self.ties else ""
        flat = (" (the model's logits are all equal within the tolerance, so top-1 tells nothing: an untrained "
                "model?)") if self.flat else ""
        return (f"largest logit difference {self.max_diff:.3g} (allowed {self.tolerance:.3g}: 1e-4 x max(1, largest "
                f"|logit| {self.scale:.3g})), top-1 agrees on {self.agree}/{self.count}{ties}{flat}")


def compare(reference: np.ndarray, got: np.ndarray) -> Verdict:
    """``got`` (the export's logits) against ``reference`` (PyTorch's), row by row (see Verdict)."""
    reference, got = reference.astype(np.float64), got.astype(np.float64)
    if got.shape != reference.shape:
        return Verdict(len(reference), float("inf"), float(np.abs(reference).max()), 0, 0)
    max_diff = float(np.abs(got - reference).max()) if got.size else 0.0
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    tol = RTOL * max(1.0, scale)
    mine, theirs = reference.argmax(1), got.argmax(1)
    rows = np.arange(len(reference))
    margin = reference[rows, mine] - reference[rows, theirs]
    agree = int((mine == theirs).sum())
    ties = int(((mine != theirs) & (margin <= tol)).sum())
    flat = bool(reference.size) and float((reference.max(1) - reference.min(1)).max()) <= tol
    return Verdict(len(reference), float("nan") if np.isnan(got).any() else max_diff, scale, agree, ties, flat)


def _dynamic(batch: int | None) -> dict:
    """torch.export's dynamic batch dimension (``batch`` None), or nothing (a fixed batch)."""
    return {} if batch else {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1)},)}


def _onnx_dynamo(model: nn.Module, example: torch.Tensor, batch: int | None, opset: int | None) -> bytes:
    program = torch.onnx.export(model, (example,), None, dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                opset_version=opset, verbose=False, **_dynamic(batch))
    return program.model_proto.SerializeToString()


def _onnx_torchscript(model: nn.Module, example: torch.Tensor, batch: int | None, opset: int | None) -> bytes:
    buf = io.BytesIO()
    axes = None if batch else {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}
    with warnings.catch_warnings():
        # its deprecation notice and the tracer's warnings: whether the trace is right, the check measures
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes=axes, opset_version=opset)
    return buf.getvalue()


def _with_onnx_metadata(data: bytes, metadata: Mapping[str, str]) -> bytes:
    proto = require("onnx").load_from_string(data)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def _onnx_runner(data: bytes) -> Callable[[np.ndarray], np.ndarray]:
    ort = require("onnxruntime")
    session = ort.InferenceSession(data, sess_options=session_options(ort), providers=["CPUExecutionProvider"])
    return lambda x: session.run([OUTPUT], {INPUT: x})[0]


def _program(model: nn.Module, example: torch.Tensor, batch: int | None) -> torch.export.ExportedProgram:
    """torch.export's program, non-strict first (it traces through more Python), then strict."""
    try:
        return torch.export.export(model, (example,), strict=False, **_dynamic(batch))
    except Exception:  # noqa: BLE001 - the strict tracer handles some models the non-strict one cannot
        return torch.export.export(model, (example,), strict=True, **_dynamic(batch))


def _program_bytes(program: torch.export.ExportedProgram, metadata: Mapping[str, str]) -> bytes:
    buf = io.BytesIO()
    document = {key: json.loads(value) for key, value in metadata.items()}  # one JSON document, not nested strings
    torch.export.save(program, buf, extra_files={PT2_METADATA: json.dumps(document)})
    return buf.getvalue()


def _program_runner(data: bytes) -> Callable[[np.ndarray], np.ndarray]:
    module = torch.export.load(io.BytesIO(data)).module()  # the published bytes, read back

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()
    return run


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Without torch's notes while an exporter fails (torch.export prints the graph to stderr, its
    shape solver logs guard warnings): the one-line reason (:func:`_reason`) says what failed, and
    the next exporter is tried."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _reason(exc: BaseException) -> str:
    """``Type: first line`` of the deepest cause of ``exc`` (torch.onnx wraps torch.export's error in
    a generic 'step 1/3' one), without terminal colour codes."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    first = re.sub(r"\x1b\[[0-9;]*m", "", (str(exc).strip().splitlines() or [""])[0])
    return f"{type(exc).__name__}: {first[:200]}"


def _build(exporter: str, model: nn.Module, example: torch.Tensor, batch: int | None, opset: int | None,
           metadata: Mapping[str, str]) -> tuple[bytes, Callable[[np.ndarray], np.ndarray]]:
    """The file's bytes (metadata included: what is checked is what is published) and a runner of them."""
    metadata = {**metadata, "exporter": json.dumps(exporter)}  # every value JSON, as the others
    if exporter == "torch.export":
        data = _program_bytes(_program(model, example, batch), metadata)
        return data, _program_runner(data)
    make = _onnx_dynamo if exporter == "dynamo" else _onnx_torchscript
    data = _with_onnx_metadata(make(model, example, batch, opset), metadata)
    return data, _onnx_runner(data)


def chunks(count: int, batch: int | None) -> list[tuple[np.ndarray, int]]:
    """The rows of each run of the check and how many of them are new: a dynamic batch at 1 and then
    all the others (two batch sizes); a fixed one in runs of ``batch``, the last filled up with the
    first rows again (only its new rows are compared)."""
    if not batch:
        return [(np.arange(1), 1)] + ([(np.arange(1, count), count - 1)] if count > 1 else [])
    return [(np.arange(start, start + batch) % count, min(batch, count - start)) for start in range(0, count, batch)]


@dataclass(frozen=True)
class Exported:
    data: bytes
    exporter: str  # a key of EXPORTERS
    verdict: Verdict


def export_checked(model: nn.Module, inputs: np.ndarray, *, fmt: str, batch: int | None, opset: int | None,
                   metadata: Mapping[str, str], say: Callable[[str], None] = print) -> Exported:
    """Export ``model`` (eval mode, CPU) to ``fmt`` and check it on ``inputs`` (N, 3, H, W: what the
    file takes) against ``model`` on the same batches; the first exporter of FORMATS[fmt] whose file
    passes (see Verdict) wins. ``batch``: a fixed batch size, or None for a dynamic one. ExportError
    with every exporter's figures or error when none passes."""
    for module in PACKAGES[fmt]:
        require(module)
    runs = chunks(len(inputs), batch)
    with torch.no_grad():  # the PyTorch model on the same batches as the export (a model may look at the batch)
        reference = np.concatenate([model(torch.from_numpy(inputs[rows])).numpy()[:new] for rows, new in runs])
    example = torch.from_numpy(inputs[np.arange(batch or 2) % len(inputs)])  # batch 1 is a constant to torch.export
    failures: list[str] = []
    order = FORMATS[fmt]
    for i, exporter in enumerate(order):
        then = f"; trying {EXPORTERS[order[i + 1]]}" if i + 1 < len(order) else ""
        try:
            with _quiet_torch():
                data, run = _build(exporter, model, example, batch, opset, metadata)
            got = np.concatenate([run(inputs[rows])[:new] for rows, new in runs])
        except Exception as exc:  # noqa: BLE001 - an exporter or runtime failure: named, then the next exporter
            failures.append(f"{EXPORTERS[exporter]} raised {_reason(exc)}")
            say(f"export: {failures[-1]}{then}")
            continue
        verdict = compare(reference, got)
        say(f"check ({exporter}): {verdict.text()}")
        if verdict.ok:
            return Exported(data, exporter, verdict)
        failures.append(f"{EXPORTERS[exporter]}: {verdict.text()}")
        say(f"export: {EXPORTERS[exporter]} failed the check{then}")
    raise ExportError("export refused (nothing written): " + "; ".join(failures))
