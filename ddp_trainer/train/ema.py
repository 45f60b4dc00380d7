"""An exponential moving average of the model's weights and buffers (``train.ema_decay``), as in
torchvision's and timm's recipes: ``ema = decay * ema + (1 - decay) * weights`` after every optimizer
step, the first update copying the weights. Built on :class:`torch.optim.swa_utils.AveragedModel`.

Every rank keeps one (parameters are equal across DDP ranks after each step); rank 0's is saved as
``model_ema`` and its buffers are given to every rank before the EMA is validated, like the model's.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..checkpoint.registry import LoadContext, SaveContext


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        """``model``: the plain module (not a DDP / DataParallel / compiled wrapper)."""
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def save(self, ctx: SaveContext) -> dict[str, Any]:
        """``{"weights": state dict (CPU), "n_averaged": updates so far, "decay"}`` (``model_ema``)."""
        return {"weights": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()},
                "n_averaged": int(self.averaged.n_averaged.item()), "decay": self.decay}

    def load(self, sd: dict[str, Any], ctx: LoadContext) -> None:
        self.module.load_state_dict(sd["weights"])
        self.averaged.n_averaged.fill_(int(sd["n_averaged"]))
