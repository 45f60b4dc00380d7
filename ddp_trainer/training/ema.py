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
import logging
from typing import Any

import torch
from torch import nn

from ..checkpoint.registry import LoadContext, SaveContext

log = logging.getLogger("ddp_trainer")


def ema_schedule(decay: float, every_steps: int, adjust: str, global_batch: int, epochs: int,
                 warmup_epochs: float) -> tuple[float, float]:
    """(the decay of one update, the epoch until which updates copy the weights) for the config's
    ``train.ema_decay`` / ``ema_every_steps`` / ``ema_decay_adjust``. ``torchvision``: its train.py's
    ``alpha = min(1, (1 - decay) x world x batch x model_ema_steps / epochs)``, and the EMA reset to the
    weights at each update of a warmup epoch; ``none``: the decay as given, no copying."""
    if adjust != "torchvision":
        return decay, 0.0
    alpha = min(1.0, (1.0 - decay) * global_batch * every_steps / epochs)
    return 1.0 - alpha, warmup_epochs


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float, every_steps: int = 1, copy_before_epoch: float = 0.0) -> None:
        """``model``: the plain module (not a DDP / DataParallel / compiled wrapper); ``decay`` per
        update; an update every ``every_steps`` optimizer steps; updates in epochs before
        ``copy_before_epoch`` copy the weights (torchvision keeps the EMA equal to the model in warmup)."""
        self.decay = decay
        self.every_steps = every_steps
        self.copy_before_epoch = copy_before_epoch
        self.module = copy.deepcopy(model)
        self.n_averaged = 0

    def after_step(self, model: nn.Module, step: int, epoch: int) -> None:
        """Called after optimizer step ``step`` (1-based, counted over the run) of ``epoch``: an update
        when ``step`` is a multiple of ``every_steps`` (a function of the step count, so a resume at
        any point makes the same updates)."""
        if step % self.every_steps:
            return
        self.update(model)
        if epoch < self.copy_before_epoch:
            self.n_averaged = 0  # the next update copies again (torchvision: n_averaged.fill_(0))

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
        """Our ``model_ema`` entry, or another trainer's EMA read into it (torchvision's and timm's
        ``--model-ema``, wrapper prefixes stripped by the reader), and an unknown update count taken as "already
        averaging" (the next update blends instead of copying)."""
        self.module.load_state_dict(sd["weights"])  # canonical keys (the reader strips a foreign wrapper's)
        self.n_averaged = 1 if sd.get("n_averaged") is None else int(sd["n_averaged"])
        if not ctx.checkpoint.ours:
            log.info("resume: the EMA weights of the %s file carried over (%s updates so far%s); train.ema_decay=%g "
                     "from now on", ctx.checkpoint.kind, "unknown" if sd.get("n_averaged") is None else self.n_averaged,
                     "" if sd.get("decay") is None else f", its decay {sd['decay']:.6g}", self.decay)
