"""A BatchNorm CNN whose logits are multiplied by 100: under fp16 autocast its gradients overflow at
GradScaler's first scale (65536), as real fp16 runs' first steps do; the scaler skips such a step
and lowers the scale. Used as ``model.name=loud_model:build`` with tests/helpers on PYTHONPATH."""
from ddp_trainer.models import TinyCNN


class LoudCNN(TinyCNN):
    def forward(self, x):
        return super().forward(x) * 100.0


def build(num_classes: int) -> LoudCNN:
    return LoudCNN(num_classes, batchnorm=True)
