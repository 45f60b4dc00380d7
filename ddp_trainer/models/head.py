"""Which parameters are a model's classifier head (left new when a start's class count differs)."""
from __future__ import annotations

from torch import nn


def classifier_head(model: nn.Module) -> list[str]:
    """Parameter-name prefixes of the final classification layer: the last ``nn.Linear`` (for a
    timm model, the module its ``get_classifier()`` returns, which may be a 1x1 convolution)."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        found = get()
        for mod_name, mod in model.named_modules():
            if mod is found and mod_name and any(True for _ in mod.parameters()):
                return [f"{mod_name}."]
    last_linear = None
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last_linear = mod_name
    return [f"{last_linear}."] if last_linear else []
