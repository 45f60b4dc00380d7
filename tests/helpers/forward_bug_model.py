"""A BatchNorm CNN whose global rank 1 raises ValueError at its ``BUG_AT_FORWARD``-th training
forward (default 2: the forward where DDP's bucket rebuild is due): a model's own error, to be told
apart from a lost peer. Used as ``model.name=forward_bug_model:build`` with tests/helpers on PYTHONPATH."""
import os

from ddp_trainer.models import TinyCNN


class BuggyCNN(TinyCNN):
    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes, batchnorm=True)
        self.forwards = 0

    def forward(self, x):
        if self.training:
            self.forwards += 1
            if os.environ.get("RANK") == "1" and self.forwards == int(os.environ.get("BUG_AT_FORWARD", "2")):
                raise ValueError(f"a bug in the model at forward {self.forwards}")
        return super().forward(x)


def build(num_classes: int) -> BuggyCNN:
    return BuggyCNN(num_classes)
