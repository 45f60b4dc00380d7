"""``model.name=timm/NAME``: timm's models (``timm/resnet50``, tagged ``timm/resnet50.a1_in1k``),
built by ``timm.create_model`` with the arguments timm's ``train.py`` passes (``num_classes``,
``drop_rate``, ``drop_path_rate``) and ``pretrained=False``: weights come only from local files
(:mod:`.timm_weights`). timm is an optional extra, imported when a timm model is asked for."""
from __future__ import annotations

import difflib
from types import ModuleType

import torch
from torch import nn

from ..errors import ConfigError
from ..extras import optional

PREFIX = "timm/"


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX)


def timm_name(name: str) -> str:
    """``timm/resnet50.a1_in1k`` -> ``resnet50.a1_in1k`` (what ``timm.create_model`` takes)."""
    return name[len(PREFIX):]


def load_timm(name: str) -> ModuleType:
    """The timm package, or one line saying how to install it."""
    return optional("timm", f"model.name={name}", "timm")


def check_name(name: str) -> None:
    """ConfigError naming the closest timm models when ``name`` is not one (or its tag is unknown)."""
    timm = load_timm(name)
    bare = timm_name(name)
    arch, _, tag = bare.partition(".")
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = (f"did you mean {', '.join(PREFIX + c for c in close)}?" if close
                else "list them with python -c \"import timm; print(timm.list_models('resnet*'))\"")
        raise ConfigError(f"model.name: timm has no model {arch!r}; {hint}")
    if tag:
        tags = timm.list_pretrained(f"{arch}.*")
        if bare not in tags:
            close = difflib.get_close_matches(bare, tags, n=3, cutoff=0.0)
            choices = ", ".join(PREFIX + c for c in close) if close else f"{PREFIX}{arch} (it has no tagged weights)"
            raise ConfigError(f"model.name: timm has no weights tag {tag!r} for {arch}; choose one of {choices}")


def meta_model(name: str) -> nn.Module:
    """``timm/NAME`` built on the meta device, for what timm attaches to it (its pretrained config):
    no memory, no init time."""
    check_name(name)
    with torch.device("meta"):
        return load_timm(name).create_model(timm_name(name), pretrained=False)


def build(name: str, num_classes: int, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> nn.Module:
    """``timm.create_model(NAME, pretrained=False, num_classes=N, drop_rate=..., drop_path_rate=...)``.
    ``drop_path_rate`` is passed only when non-zero (timm's default is 0, and a model without
    stochastic depth refuses the keyword); a refused rate is a ConfigError naming the model."""
    check_name(name)
    timm = load_timm(name)
    kwargs = {"drop_rate": drop_rate}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        return timm.create_model(timm_name(name), pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        keyword = next((k for k in kwargs if repr(k) in str(exc)), None)
        if keyword is None:
            raise
        key = "model." + keyword
        raise ConfigError(f"{key}={kwargs[keyword]:g}: timm's {timm_name(name)} has no {keyword} setting; "
                          f"remove {key}") from None


def fixed_input_size(name: str) -> tuple[int, int] | None:
    """The one input size ``timm/NAME`` accepts when built as :func:`build` builds it (a ViT, DeiT or
    Swin: its patch embedding refuses others, and its position embedding is of that grid), else None.
    Built on the meta device: no memory, no init time."""
    embed = getattr(meta_model(name), "patch_embed", None)
    if embed is None or not getattr(embed, "strict_img_size", False) or getattr(embed, "img_size", None) is None:
        return None
    return tuple(embed.img_size)  # type: ignore[return-value]


def check_input_size(name: str, sizes: dict[str, int]) -> None:
    """ConfigError naming the ``data.*`` key whose size ``timm/NAME`` cannot take (``sizes``: key ->
    square side). timm's ``train.py`` builds such a model at another size only when told to
    (``--model-kwargs img_size=...``), which then needs its pretrained position embedding resampled;
    this trainer builds timm models at their own size, so it says which size that is."""
    fixed = fixed_input_size(name)
    if fixed is None:
        return
    for key, side in sizes.items():
        if (side, side) != fixed:
            raise ConfigError(f"{key}={side}: {name} takes {fixed[0]}x{fixed[1]} inputs only (its patch and "
                              f"position embeddings are of that size); set {key}={fixed[0]}, or choose a "
                              f"timm model made for {side} px")
