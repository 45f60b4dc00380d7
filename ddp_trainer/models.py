"""Model construction by name: torchvision classifiers, small test nets, or ``package.module:callable``."""
from __future__ import annotations

import difflib
import importlib

import torch
import torchvision
from torch import nn

from .errors import ConfigError


class TinyCNN(nn.Module):
    """A small, fast CNN for tests and smoke runs (optionally with BatchNorm)."""

    def __init__(self, num_classes: int, batchnorm: bool = False, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm)]
            if batchnorm:
                layers.append(nn.BatchNorm2d(cout))
            return layers + [nn.ReLU(inplace=True), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(3, width), *block(width, 2 * width), *block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


LOCAL_MODELS = {
    "tiny_cnn": lambda n: TinyCNN(n, batchnorm=False),
    "tiny_cnn_bn": lambda n: TinyCNN(n, batchnorm=True),
}


def _torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(name: str, num_classes: int) -> nn.Module:
    """A fresh, randomly initialised model with ``num_classes`` outputs (never downloads weights).

    ``name``: a torchvision classification builder (``resnet18``, ``mobilenet_v3_small``, ...),
    ``tiny_cnn`` / ``tiny_cnn_bn``, or ``package.module:callable`` called as ``callable(num_classes=N)``.
    """
    if name in LOCAL_MODELS:
        return LOCAL_MODELS[name](num_classes)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"model.name: cannot import {name!r} ({exc}); check the module path "
                              f"and that it is importable (PYTHONPATH)") from None
        model = factory(num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.name: {name!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    check_model_name(name)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def check_model_name(name: str) -> None:
    """Reject an unknown torchvision name (with the closest one) without building anything;
    ``package.module:callable`` names are checked when imported."""
    if name in LOCAL_MODELS or ":" in name:
        return
    names = _torchvision_names()
    if name not in names:
        close = difflib.get_close_matches(name, names + list(LOCAL_MODELS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else "use a torchvision classifier name such as resnet18"
        raise ConfigError(f"model.name: unknown model {name!r}; {hint}")


def classifier_head(model: nn.Module) -> list[str]:
    """Parameter-name prefixes of the final classification layer (left new when class counts differ)."""
    last_linear = None
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last_linear = mod_name
    return [f"{last_linear}."] if last_linear else []
