"""An exported ONNX file as a classifier, from the file alone: its class names and input side (size,
crop, interpolation, mean, std, whether it normalises inside) come from the metadata that
``ddp-trainer export`` wrote into it; only ONNX Runtime runs the model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data.images import load_rgb
from ..data.transforms import ImageTransform, Normalize
from ..errors import ExportError, show_path
from .artifact import INPUT, OUTPUT, require, session_options

NEEDED = ("classes", "image_size", "val_resize", "interpolation", "mean", "std", "preprocess")


class OnnxClassifier:
    """``OnnxClassifier(path).probabilities(image_file)``: the class probabilities of one image."""

    def __init__(self, path: str | Path) -> None:
        ort = require("onnxruntime", "predict --model")
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"--model '{show_path(path)}' not found; pass a file written by ddp-trainer export")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=session_options(ort),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - whatever ONNX Runtime refuses, the file is not usable
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ExportError(f"--model '{show_path(path)}' is not an ONNX file ONNX Runtime loads ({first}); "
                              f"pass a file written by ddp-trainer export") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in NEEDED if k not in meta]
        if missing:
            raise ExportError(f"--model '{show_path(path)}' lacks the metadata {missing[0]!r} (not written by "
                              f"ddp-trainer export); export the checkpoint with ddp-trainer export")
        info = {k: json.loads(meta[k]) for k in NEEDED}
        self.classes: list[str] = info["classes"]
        size = int(info["image_size"])
        resize = int(info["val_resize"])
        self.transform = ImageTransform(size, (), resize=None if resize == size else resize,
                                        interpolation=info["interpolation"])
        self.normalize = None if info["preprocess"] else Normalize(info["mean"], info["std"])
        batch = self.session.get_inputs()[0].shape[0]
        self.batch = batch if isinstance(batch, int) else 1  # a fixed batch: filled up with copies

    def inputs(self, image_file: str | Path) -> np.ndarray:
        """What the file takes for one image: the validation geometry, normalised unless it does that."""
        x = self.transform(load_rgb(image_file), None)[None]
        x = x if self.normalize is None else self.normalize(x)
        return np.repeat(x.numpy(), self.batch, axis=0)

    def probabilities(self, image_file: str | Path) -> np.ndarray:
        logits = self.session.run([OUTPUT], {INPUT: self.inputs(image_file)})[0][:1]
        return torch.softmax(torch.from_numpy(logits).double(), dim=1)[0].numpy()
