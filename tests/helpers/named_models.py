"""Small models whose parameter names or order test the checkpoint's by-name promises (issue 28, B
and C). Used as ``model.name=named_models:<callable>`` with tests/helpers on PYTHONPATH.

``ordered``: two equal-shaped hidden layers ``a`` and ``b``, registered in the order that
``NAMED_ORDER`` says (``ab``, the default, or ``ba``): the same state dict keys and shapes either
way, other parameter positions. ``NAMED_FREEZE=a`` freezes layer ``a`` (the optimizer then holds
fewer parameters than the checkpoint's).
``module_child``: children named ``module``, at the top and inside another child.
``orig_mod_child``: a child named ``_orig_mod`` (torch.compile's attribute name).
"""
import os

import torch
from torch import nn


class Ordered(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        for name in os.environ.get("NAMED_ORDER", "ab"):
            setattr(self, name, nn.Linear(8, 8))
        self.fc = nn.Linear(8, num_classes)
        frozen = os.environ.get("NAMED_FREEZE")
        if frozen:
            getattr(self, frozen).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x)).mean((2, 3))
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))))


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Conv2d(8, 8, 3, padding=1)  # body.module.weight: "module" inside a key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.module(x))


class ModuleChild(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.module = nn.Conv2d(3, 8, 3, padding=1)  # module.weight: a leading "module." on some keys only
        self.body = Body()
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.module(x))).mean((2, 3)))


class OrigModChild(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self._orig_mod = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._orig_mod(x).mean((2, 3)))


def ordered(num_classes: int) -> Ordered:
    return Ordered(num_classes)


def module_child(num_classes: int) -> ModuleChild:
    return ModuleChild(num_classes)


def orig_mod_child(num_classes: int) -> OrigModChild:
    return OrigModChild(num_classes)
