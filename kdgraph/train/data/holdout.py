"""``data.holdout``: a validation split carved from the training data, disjoint from what a run trains on.

``kdgraph tune`` scores its trials on it, so hyper-parameters are never chosen on the evaluation split the
tables report. The held-out images are a seeded random choice of the training split (``count`` images or a
``fraction`` of them, ``seed`` independent of ``runtime.seed``): :func:`holdout_indices` gives both index lists
(sorted, disjoint, covering the split), :func:`split_holdout` the two datasets; the held-out one is read
without training augmentation. ``data.train_subset`` then takes the first images of what remains.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset, Subset

from ...errors import DataError
from .fashion_mnist import TensorImages

__all__ = ["holdout_indices", "split_holdout", "select"]


def holdout_indices(n: int, count: int | None, fraction: float | None, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of a split of ``n`` items; both sorted, disjoint, together all."""
    k = int(count) if count is not None else int(round(float(fraction) * n))  # type: ignore[arg-type]
    if not 1 <= k < n:
        raise DataError(f"data.holdout: {k} held-out image(s) of a training split of {n}; hold out at least one "
                        f"and leave at least one to train on (count between 1 and {n - 1}, or a smaller fraction)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


class _BatchSubset(Subset):
    """A Subset of a dataset that builds whole batches (``get_batch``), keeping that ability."""

    def get_batch(self, indices: Sequence[int], seeds: Any = None) -> Any:
        return self.dataset.get_batch([self.indices[i] for i in indices], seeds)  # type: ignore[attr-defined]


def select(dataset: Dataset, indices: Sequence[int]) -> Dataset:
    """The items ``indices`` of ``dataset`` (in that order), still a batch reader when ``dataset`` is one."""
    if isinstance(dataset, TensorImages):
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return TensorImages(dataset.images[idx], dataset.targets[idx], dataset.mean, dataset.std, dataset.classes,
                            dataset.size, dataset.channels, dataset.augment, dataset.pad)
    cls = _BatchSubset if callable(getattr(type(dataset), "get_batch", None)) else Subset
    return cls(dataset, list(indices))


def evaluation_view(dataset: Dataset, size: tuple[int, int], channels: int) -> Dataset:
    """The training split read as an evaluation split is: no random augmentation."""
    if isinstance(dataset, TensorImages):
        view = copy.copy(dataset)
        view.augment = False
        return view
    if hasattr(dataset, "transform") and hasattr(dataset, "samples"):  # an ImageFolder: the validation transforms
        from .image_folder import imagenet_transforms

        view = copy.copy(dataset)
        view.transform = imagenet_transforms(size, channels, False)  # type: ignore[attr-defined]
        return view
    return dataset  # synthetic images and GLUE text carry no augmentation


def split_holdout(full: Dataset, count: int | None, fraction: float | None, seed: int, size: tuple[int, int],
                  channels: int) -> tuple[Dataset, Dataset, list[int], list[int]]:
    """(training part, held-out part read for evaluation, their indices into ``full``)."""
    keep, held = holdout_indices(len(full), count, fraction, seed)  # type: ignore[arg-type]
    return select(full, keep), select(evaluation_view(full, size, channels), held), keep, held
