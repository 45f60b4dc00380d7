"""torchvision's classification builders (``resnet18``, ``convnext_tiny``, ...), with
``model.drop_rate`` as the builder's ``dropout`` and ``model.drop_path_rate`` as its
``stochastic_depth_prob`` where it takes them."""
from __future__ import annotations

import difflib

import torchvision
from torch import nn

from ..errors import ConfigError

# our key -> the keyword torchvision's model classes use for it
KEYWORDS = {"model.drop_rate": "dropout", "model.drop_path_rate": "stochastic_depth_prob"}
WITH = {"model.drop_rate": "vit_*, efficientnet_*, mobilenet_*, swin_*, vgg*, alexnet, ...",
        "model.drop_path_rate": "convnext_*, efficientnet_*, swin_*, maxvit_t"}


def names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_name(name: str, extra: list[str] = ()) -> None:
    """ConfigError with the closest name when ``name`` is no torchvision classifier."""
    known = names()
    if name not in known:
        close = difflib.get_close_matches(name, known + list(extra), n=1, cutoff=0.6)
        hint = (f"did you mean {close[0]!r}?" if close
                else "use a torchvision classifier name such as resnet18, or timm/NAME for a timm model")
        raise ConfigError(f"model.name: unknown model {name!r}; {hint}")


def build(name: str, num_classes: int, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> nn.Module:
    """A fresh ``name`` with ``num_classes`` outputs. A rate of 0 is not passed, so the builder keeps
    its own default (ConvNeXt-T's stochastic depth 0.1, EfficientNet-B0's dropout 0.2): a run
    without the keys builds what it built before they existed."""
    asked = {KEYWORDS[k]: v for k, v in (("model.drop_rate", drop_rate), ("model.drop_path_rate", drop_path_rate)) if v}
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **asked)
    except TypeError as exc:
        # the builders pass unknown keywords on to the model class, which names the one it refused
        refused = [k for k, kw in KEYWORDS.items() if kw in asked and repr(kw) in str(exc)]
        if not refused:
            raise
        key = refused[0]
        raise ConfigError(f"{key}={asked[KEYWORDS[key]]:g}: torchvision's {name} has no {KEYWORDS[key]} setting; "
                          f"remove {key} (torchvision models with it: {WITH[key]})") from None
