"""Reproducible sampling: per-sample seeds, the resumable / sharding samplers, the seeded dataset view.

The sampler yields ``(index, epoch)`` keys and every sample's random augmentation is seeded by
``(seed, epoch, index)``, so a batch's content depends neither on the number of DataLoader workers, nor on
the world size, nor on where a run was resumed. That is what makes a resumed run end with the same
parameters as an uninterrupted one, and a DDP run see the same global batches as one process.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from ...distiller.data import Batch
from ...errors import DataError

__all__ = ["sample_seed", "uniform_from_seeds", "ResumableSampler", "ShardSampler", "SeededView",
           "has_batch_reader", "collate"]

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation in one epoch (63-bit, for ``torch.manual_seed``)."""
    return _mix64(_mix64(_mix64(seed) ^ epoch) ^ index) >> 1


def uniform_from_seeds(seeds: torch.Tensor, salt: int) -> torch.Tensor:
    """Vectorised per-sample uniform numbers in [0, 1) from int64 seeds (an xorshift-multiply hash)."""
    x = seeds ^ (salt * 0x2545F4914F6CDD1D)
    x = x ^ (x >> 33)
    x = x * -49064778989728563  # 0xff51afd7ed558ccd as int64
    x = x ^ (x >> 33)
    x = x * -4265267296055464877  # 0xc4ceb9fe1a85ec53 as int64
    x = x ^ (x >> 33)
    return (x & ((1 << 24) - 1)).double() / float(1 << 24)


class ResumableSampler(Sampler):
    """A DistributedSampler that can start mid-epoch and yields ``(index, epoch)`` keys.

    Epoch ``e``'s order is ``randperm(n)`` from a generator seeded with ``seed + e`` (the same
    rule for every world size), trimmed to a multiple of ``num_replicas`` when ``drop_last``
    (training) or padded by repetition otherwise; rank ``r`` takes every ``num_replicas``-th
    entry from ``r``. So the ``k``-th global batch of a run with ``W`` processes of ``B/W`` images
    holds exactly the images of the ``k``-th batch of one process with ``B`` images.
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True):
        if length < 1:
            raise DataError("the dataset is empty")
        self.length, self.num_replicas, self.rank = length, num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.start = 0  # samples of this rank's share to skip (resume mid-epoch)

    @property
    def per_rank(self) -> int:
        if self.drop_last:
            return self.length // self.num_replicas
        return -(-self.length // self.num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.length, generator=g).tolist()
        else:
            perm = list(range(self.length))
        total = self.per_rank * self.num_replicas
        if total <= len(perm):
            perm = perm[:total]
        else:
            perm = (perm * (total // len(perm) + 1))[:total]
        return perm[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.order()[self.start:]:
            yield (i, self.epoch)

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


class ShardSampler(Sampler):
    """Evaluation: rank ``r`` reads indices ``r, r + W, ...``; no padding, so every image counts once."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((i, 0) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededView(Dataset):
    """Reads ``(index, epoch)`` keys; seeds each sample's augmentation by ``(seed, epoch, index)``.

    Datasets with a ``get_batch(indices, seeds)`` method build whole batches in one call (the
    in-memory ones); any other dataset, such as ImageFolder or a data wrapper, is read one item at a
    time under ``torch.random.fork_rng`` with that seed (torchvision's transforms and the CRD
    wrapper draw from torch's global RNG), leaving the process's own RNG untouched.
    """

    def __init__(self, dataset: Dataset, seed: int, train: bool, mix: Any = None):
        self.dataset, self.seed, self.train = dataset, seed, train
        self.mix = mix  # data.augment's mixup / cutmix (augment.BatchMix): (collated batch, first key) -> batch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _seed(self, index: int, epoch: int) -> int:
        return sample_seed(self.seed, epoch, index)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        if not self.train:
            return self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            # the CPU generator, the one fork_rng(devices=[]) saves; torch.manual_seed would also seed every
            # accelerator's, ~0.5 ms per call on a CUDA build
            torch.default_generator.manual_seed(self._seed(index, epoch))
            return self.dataset[index]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> Any:
        if has_batch_reader(self.dataset):
            get_batch = self.dataset.get_batch  # type: ignore[attr-defined]
            idx = [k[0] for k in keys]
            seeds = [self._seed(i, e) for i, e in keys] if self.train else None
            out = get_batch(idx, seeds)
        else:
            out = [self[k] for k in keys]
        if self.mix is not None and self.train and keys:
            return self.mix(collate(out), keys[0])
        return out


def has_batch_reader(dataset: Any) -> bool:
    """Whether the dataset's own class builds whole batches (``get_batch``); a wrapper that forwards
    attribute lookups to what it wraps (CRD's) does not count."""
    return callable(getattr(type(dataset), "get_batch", None))


def collate(items: Any) -> Any:
    """A batch a dataset built whole (a :class:`Batch`, or a dict of tensors such as GLUE's) as it is; a list
    of items through ``default_collate``."""
    return items if isinstance(items, (Batch, dict)) else default_collate(items)
