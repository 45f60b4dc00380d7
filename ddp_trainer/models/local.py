"""The project's own small nets, for tests and smoke runs (``tiny_cnn``, ``tiny_cnn_bn``)."""
from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """A small, fast CNN for tests and smoke runs (optionally with BatchNorm)."""

    def __init__(self, num_classes: int, batchnorm: bool = False, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm)]
            if batchnorm:
                layers.append(nn.BatchNorm2d(cout))
            return layers + [nn.ReLU(inplace=True), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(3, width), *block(width, 2 * width), *block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


LOCAL_MODELS = {
    "tiny_cnn": lambda n: TinyCNN(n, batchnorm=False),
    "tiny_cnn_bn": lambda n: TinyCNN(n, batchnorm=True),
}
