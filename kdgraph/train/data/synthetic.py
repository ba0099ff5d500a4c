"""Synthetic data: random images with random labels (``data.dataset: synthetic``), for smoke runs and speed."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset

from ...distiller.data import Batch

__all__ = ["SyntheticImages", "synthetic_datasets"]


class SyntheticImages(Dataset):
    """Random images (a fixed normal draw per index) with random labels: for smoke runs and speed."""

    def __init__(self, length: int, channels: int, size: tuple[int, int], num_classes: int, seed: int = 0):
        self.length, self.channels, self.size, self.num_classes = length, channels, tuple(size), num_classes
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, num_classes, (length,), generator=g)
        self.seed = seed
        self.classes = [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return self.length

    def get_batch(self, indices: Sequence[int], seeds: Optional[Sequence[int]]) -> Batch:
        imgs = [self[i][0] for i in indices]
        return Batch(torch.stack(imgs), self.targets[torch.as_tensor(indices, dtype=torch.long)])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        return torch.randn(self.channels, *self.size, generator=g), int(self.targets[index])


def synthetic_datasets(train_size: Optional[int], val_size: Optional[int], channels: int, size: tuple[int, int],
                       num_classes: int, seed: int) -> tuple[Dataset, Dataset, str]:
    """(training split, validation split, description): 512 / 128 images unless sizes are given."""
    return (SyntheticImages(train_size or 512, channels, size, num_classes, seed=seed),
            SyntheticImages(val_size or 128, channels, size, num_classes, seed=seed + 1), "synthetic random images")
