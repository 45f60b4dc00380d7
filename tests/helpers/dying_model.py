"""A BatchNorm CNN whose global rank 1 ends its process in the middle of a backward pass, at its
``DIE_AT_STEP``-th training forward (default 3): a peer that dies while DDP's gradient all-reduce
runs. Used as ``model.name=dying_model:build`` with tests/helpers on PYTHONPATH."""
import os

import torch

from ddp_trainer.models import TinyCNN


class _ExitInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, die):
        ctx.die = die
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.die:
            os._exit(17)
        return grad, None


class DyingCNN(TinyCNN):
    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes, batchnorm=True)
        self.forwards = 0

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        self.forwards += 1
        die = os.environ.get("RANK") == "1" and self.forwards >= int(os.environ.get("DIE_AT_STEP", "3"))
        x = _ExitInBackward.apply(self.features[0](x), die)
        x = self.features[1:](x)
        return self.fc(torch.flatten(self.pool(x), 1))


def build(num_classes: int) -> DyingCNN:
    return DyingCNN(num_classes)
