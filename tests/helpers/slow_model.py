"""A BatchNorm CNN that sleeps in forward, so that a test can kill a run in the middle of an epoch.

Used as ``model.name=slow_model:build`` with tests/helpers on PYTHONPATH.
"""
import os
import time

from ddp_trainer.models import TinyCNN


class SlowCNN(TinyCNN):
    def forward(self, x):
        if self.training:
            time.sleep(float(os.environ.get("SLOW_MODEL_SLEEP", "0.15")))
        return super().forward(x)


def build(num_classes: int) -> SlowCNN:
    return SlowCNN(num_classes, batchnorm=True)
