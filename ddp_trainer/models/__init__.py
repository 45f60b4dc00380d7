"""Model construction by name: one module per source of models.

Owns: turning ``model.name`` (with ``model.drop_rate`` / ``model.drop_path_rate``) into a fresh,
randomly initialised ``nn.Module`` with N outputs, never downloading anything; checking a name
without building; naming a model's classifier head; and where a timm model's pretrained file is
(:mod:`.timm_weights`). May import: the shared top-level modules (``errors``, ``extras``).

| ``model.name`` | module |
|---|---|
| ``tiny_cnn``, ``tiny_cnn_bn`` | :mod:`.local` |
| ``timm/NAME`` (``timm/resnet50``, ``timm/resnet50.a1_in1k``) | :mod:`.timm_nets` |
| ``package.module:callable`` | :mod:`.imported` |
| any other: a torchvision classifier builder | :mod:`.torchvision_nets` |
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from . import imported, timm_nets, torchvision_nets
from .head import classifier_head
from .local import LOCAL_MODELS, TinyCNN

__all__ = ["LOCAL_MODELS", "TinyCNN", "build_model", "check_input_size", "check_model_name", "classifier_head",
           "name_of_file_arch"]


def build_model(name: str, num_classes: int, *, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> nn.Module:
    """A fresh, randomly initialised model with ``num_classes`` outputs (never downloads weights).

    ``drop_rate`` (dropout before the classifier) and ``drop_path_rate`` (stochastic depth) reach
    the models that have such a setting; a non-zero one for a model without it is a ConfigError
    naming the model. 0 leaves a torchvision builder's own default (ConvNeXt's stochastic depth).
    """
    if name in LOCAL_MODELS or imported.is_imported(name):
        refuse_drop_rates(name, drop_rate, drop_path_rate)
        if name in LOCAL_MODELS:
            return LOCAL_MODELS[name](num_classes)
        return imported.build(name, num_classes)
    if timm_nets.is_timm(name):
        return timm_nets.build(name, num_classes, drop_rate, drop_path_rate)
    check_model_name(name)
    return torchvision_nets.build(name, num_classes, drop_rate, drop_path_rate)


def check_model_name(name: str, *, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
    """Reject an unknown name (with the closest ones), or a drop rate the model has no setting for,
    without allocating weights (a model asked for a rate is built on the meta device);
    ``package.module:callable`` names are checked when imported."""
    if name in LOCAL_MODELS or imported.is_imported(name):
        refuse_drop_rates(name, drop_rate, drop_path_rate)
        return
    if timm_nets.is_timm(name):
        timm_nets.check_name(name)
    else:
        torchvision_nets.check_name(name, extra=list(LOCAL_MODELS))
    if drop_rate or drop_path_rate:
        with torch.device("meta"):  # the builder refuses the keyword; no memory, no init time
            build_model(name, 2, drop_rate=drop_rate, drop_path_rate=drop_path_rate)


def check_input_size(name: str, sizes: dict[str, int]) -> None:
    """Reject an input side (``sizes``: ``data.*`` key -> square side) the model cannot take: a timm
    ViT or Swin takes its own size only (:func:`.timm_nets.check_input_size`); the others take any."""
    if timm_nets.is_timm(name):
        timm_nets.check_input_size(name, sizes)


def name_of_file_arch(arch: str, layout: str) -> str:
    """The ``model.name`` of the architecture another trainer's file states: a timm ``train.py``
    file's ``args.model`` that is no torchvision builder is timm's (``convnext_tiny`` is both, with
    other keys: a timm file of it needs ``--model timm/convnext_tiny``; ``resnet*`` keys agree)."""
    if layout == "timm" and arch not in LOCAL_MODELS and arch not in torchvision_nets.names():
        return timm_nets.PREFIX + arch
    return arch


def refuse_drop_rates(name: str, drop_rate: float, drop_path_rate: float) -> None:
    """A ConfigError for a model that takes neither setting when one is asked for."""
    for key, value in (("model.drop_rate", drop_rate), ("model.drop_path_rate", drop_path_rate)):
        if value:
            raise ConfigError(f"{key}={value:g}: model {name!r} has no such setting; remove {key} "
                              f"(or set it to 0)")

