"""A timm model's own data settings (``data.from_model``): what ``timm.data.resolve_data_config``
says the model was trained with (its pretrained config: input size, interpolation, mean, std,
crop_pct), as the ``data.*`` keys that hold them here."""
from __future__ import annotations

from typing import Any

from .timm_nets import load_timm, meta_model

INTERPOLATIONS = ("bilinear", "bicubic")  # what data.interpolation offers


def data_settings(name: str) -> dict[str, Any]:
    """``{"image_size": 160, "interpolation": "bilinear", "mean": [...], "std": [...],
    "val_crop_pct": 0.95}`` for ``timm/NAME`` (keys of the ``data`` section). A value this project
    cannot express is left out (the key keeps its own value): a non-square input (only its height is
    taken), an interpolation other than bilinear/bicubic, a crop_pct above 1 or a crop mode other than
    timm's centre crop."""
    cfg = load_timm(name).data.resolve_data_config({}, model=meta_model(name))
    out: dict[str, Any] = {"image_size": int(cfg["input_size"][1]),
                           "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]]}
    if cfg.get("interpolation") in INTERPOLATIONS:
        out["interpolation"] = cfg["interpolation"]
    crop = cfg.get("crop_pct")
    if crop is not None and 0 < crop <= 1 and cfg.get("crop_mode", "center") == "center":
        out["val_crop_pct"] = float(crop)
    return out
