"""A model whose export does not compute what the model computes, for the refused export of issue 32.

It reads the largest per-image spread of its batch into Python (``.tolist()``) and scales its logits
by it: a real trap of exporting by tracing. torch.export (and so the dynamo ONNX exporter) refuses
the data-dependent value; the TorchScript-based tracer records it as a constant of the example
batch, so its file scales every other batch wrongly and only the check can tell.
Used as ``model.name=export_trap:build`` with tests/helpers on PYTHONPATH.
"""
import torch
from torch import nn


class Trap(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temperature = 1.0 + max(x.std((1, 2, 3)).tolist())  # a Python float: a tracer's constant
        return self.fc(torch.relu(self.conv(x)).mean((2, 3))) * temperature


def build(num_classes: int) -> nn.Module:
    return Trap(num_classes)
