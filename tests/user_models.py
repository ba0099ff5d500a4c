"""Small user-defined networks for tests (importable as `user_models:...` from the tests folder)."""
import torch
from torch import nn


class DataDependentGate(nn.Module):
    """Branches on a tensor value: fx cannot trace this, so it must be a leaf module."""

    def forward(self, x):
        if x.mean() > 0:
            return x * 2
        return x


class TinyNet(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 10, gated: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.gate = DataDependentGate() if gated else nn.Identity()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.gate(self.stem(x))
        x = self.body(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tiny(width: int = 8, num_classes: int = 10, gated: bool = True) -> TinyNet:
    return TinyNet(width, num_classes, gated)
