"""``model.name=package.module:callable``: the user's own factory, called as ``callable(num_classes=N)``."""
from __future__ import annotations

import importlib

from torch import nn

from ..errors import ConfigError


def is_imported(name: str) -> bool:
    return ":" in name


def build(name: str, num_classes: int) -> nn.Module:
    """``callable(num_classes=N)``; ConfigError when it cannot be imported or is not a module."""
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
