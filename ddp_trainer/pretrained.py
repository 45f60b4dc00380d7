"""Pretrained weights (``model.weights``), found on this machine only: torchvision's from torch's
local hub cache (here), timm's from the Hugging Face hub cache, a folder or a file
(:mod:`.models.timm_weights`).

Training never downloads: a cluster node often has no internet, and a download racing on N ranks
is a classic failure. The file must already be in ``$TORCH_HOME/hub/checkpoints`` (torch's own
cache, where ``torchvision.models.resnet18(weights="DEFAULT")`` would have put it); when it is not,
the error names the file, the folder and the URL to fetch it from on a machine with internet.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from .errors import ConfigError
from .models import timm_nets, timm_weights


@dataclass(frozen=True)
class PretrainedFile:
    weights: str  # the full name, e.g. ResNet18_Weights.IMAGENET1K_V1
    url: str
    path: Path  # where torch's hub cache keeps it

    @property
    def present(self) -> bool:
        return self.path.is_file()


def resolve(model: str, weights: str) -> PretrainedFile | timm_weights.TimmWeightsFile:
    """The file of ``weights`` (``DEFAULT``, ``IMAGENET1K_V1``, or ``ResNet18_Weights.IMAGENET1K_V1``)
    for the torchvision classifier ``model``, or of a timm model's (:mod:`.models.timm_weights`).
    ConfigError naming the choices when either is unknown."""
    if timm_nets.is_timm(model):
        return timm_weights.resolve(model, weights)
    try:
        enum = torchvision.models.get_model_weights(model)
    except (ValueError, KeyError):
        raise ConfigError(f"model.weights: {model!r} is not a torchvision classifier with pretrained weights; "
                          f"use model.init_from=FILE for other weights", shared=True) from None
    key = weights.rsplit(".", 1)[-1]
    try:
        member = enum[key]
    except KeyError:
        choices = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))
        raise ConfigError(f"model.weights: {model} has no weights {weights!r}; choose one of {choices}",
                          shared=True) from None
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return PretrainedFile(f"{type(member).__name__}.{member.name}", member.url,
                          folder / os.path.basename(member.url))


def require(model: str, weights: str) -> PretrainedFile | timm_weights.TimmWeightsFile:
    """:func:`resolve`, and the file must be there (exit 2 saying how to put it there otherwise)."""
    found = resolve(model, weights)
    if isinstance(found, timm_weights.TimmWeightsFile):
        if not found.present:
            raise ConfigError(f"model.weights={weights}: '{found.path}' ({found.weights}) is not there and training "
                              f"never downloads; {found.how}", shared=True)
        return found
    if not found.present:
        raise ConfigError(f"model.weights={weights}: '{found.path.name}' ({found.weights}) is not in "
                          f"'{found.path.parent}' and training never downloads; on a machine with internet run "
                          f"'curl -L -o {found.path.name} {found.url}' and copy the file into that folder "
                          f"($TORCH_HOME/hub/checkpoints)", shared=True)
    return found
