"""An exponential moving average of the model's weights and buffers (``train.ema_decay``), as in
torchvision's and timm's recipes: ``ema = decay * ema + (1 - decay) * weights`` after every optimizer
step, the first update copying the weights.

The arithmetic is that of ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` and
``use_buffers=True`` (a test holds the two bitwise equal), without its per-step cost on a GPU: there
the update count is a tensor on the CPU, tested with a host sync and copied to the device at every
update; here it is a Python int, and each update is one fused ``lerp`` per dtype on the device.

Every rank keeps one (parameters are equal across DDP ranks after each step); rank 0's is saved as
``model_ema`` and its buffers are given to every rank before the EMA is validated, like the model's.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..checkpoint.registry import LoadContext, SaveContext


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        """``model``: the plain module (not a DDP / DataParallel / compiled wrapper)."""
        self.decay = decay
        self.module = copy.deepcopy(model)
        self.n_averaged = 0

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ema = [t.detach() for t in (*self.module.parameters(), *self.module.buffers())]
        now = [t.detach() for t in (*model.parameters(), *model.buffers())]
        return ema, now

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average ``model``'s current weights and buffers in (no host-device sync)."""
        ema, now = self._pairs(model)
        if self.n_averaged == 0:
            torch._foreach_copy_(ema, now)
        else:
            by_dtype: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
            for e, n in zip(ema, now):
                by_dtype.setdefault(e.dtype, ([], []))
                by_dtype[e.dtype][0].append(e)
                by_dtype[e.dtype][1].append(n)
            for dtype, (es, ns) in by_dtype.items():
                if dtype.is_floating_point or dtype.is_complex:
                    torch._foreach_lerp_(es, ns, 1 - self.decay)
                else:  # integer buffers (BatchNorm's num_batches_tracked), as AveragedModel does them
                    for e, n in zip(es, ns):
                        e.copy_(e * self.decay + n * (1 - self.decay))
        self.n_averaged += 1

    def save(self, ctx: SaveContext) -> dict[str, Any]:
        """``{"weights": state dict, "n_averaged": updates so far, "decay"}`` (``model_ema``); the
        weights are the live tensors: the checkpoint writer makes the one CPU copy."""
        return {"weights": {k: v.detach() for k, v in self.module.state_dict().items()},
                "n_averaged": self.n_averaged, "decay": self.decay}

    def load(self, sd: dict[str, Any], ctx: LoadContext) -> None:
        self.module.load_state_dict(sd["weights"])
        self.n_averaged = int(sd["n_averaged"])
