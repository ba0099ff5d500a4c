"""Shared fixtures: small inputs, random-init torchvision models, specs at 64x64."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdgraph

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"


def small_spec(name: str, size: int = 64):
    """A shipped spec with its input shrunk to ``size`` x ``size`` (same graph, fast on CPU)."""
    spec = kdgraph.load_spec(SPECS / name)
    spec.input.size = (size, size)
    return spec


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 1000, (4,), generator=g)
