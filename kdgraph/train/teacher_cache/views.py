"""Augmentation draws ("views") of the teacher cache: which seed makes view ``r`` of image ``i``, which view an
epoch replays, and reading a dataset's images under given seeds.

Every random parameter of kdgraph's training augmentation is a function of one 63-bit seed per sample:
the in-memory sets (Fashion-MNIST, synthetic) derive translation and flip from it
(:meth:`~kdgraph.train.data.TensorImages.get_batch`), an ImageFolder's torchvision transform (random resized crop,
flip) draws from torch's CPU generator seeded with it. So a view is stored as its seed (plus, for the in-memory
sets, the decoded parameters, for people), and re-applying the seed to the decoded image gives exactly the view
the teacher saw. Replay (:class:`ReplayView`): in epoch ``e`` image ``i`` uses view
``sample_seed(seed, e, i) mod R``, so a resumed run replays the same draws.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from ..data import Batch, SeededView, has_batch_reader, sample_seed

__all__ = ["view_seed", "view_of_epoch", "read_views", "ReplayView"]

_VIEW_SALT = 0x7EAC4E5EED  # view seeds are a stream apart from the epoch seeds of online training


def view_seed(seed: int, index: int, view: int) -> int:
    """The augmentation seed of view ``view`` of image ``index`` (63-bit)."""
    return sample_seed(seed ^ _VIEW_SALT, view, index)


def view_of_epoch(seed: int, epoch: int, index: int, views: int) -> int:
    """Which of the ``views`` stored draws image ``index`` replays in ``epoch``: deterministic from (seed, epoch, index)."""
    return sample_seed(seed, epoch, index) % views


def read_views(dataset: Dataset, indices: Sequence[int], seeds: Sequence[int]) -> Any:
    """Items ``indices`` of the training set, augmented with ``seeds``: a :class:`Batch` (in-memory sets) or the
    collated items of any other dataset, each read under torch's CPU generator seeded with its seed."""
    if has_batch_reader(dataset):
        return dataset.get_batch(list(indices), list(seeds))  # type: ignore[attr-defined]
    items = []
    for i, s in zip(indices, seeds):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(s))
            items.append(dataset[int(i)])
    return default_collate(items)


def as_batch(collated: Any) -> Batch:
    """A collated batch (Batch, (images, targets) or a wrapper's dict) as a :class:`Batch`."""
    if isinstance(collated, Batch):
        return collated
    if isinstance(collated, dict):
        rest = {k: v for k, v in collated.items() if k not in ("images", "targets")}
        return Batch(collated["images"], collated["targets"], rest)
    return Batch(collated[0], collated[1])


class ReplayView(SeededView):
    """The training view of a stage whose teacher logits come from a cache: key ``(index, epoch)`` is read with
    the seed of the view that epoch replays, and the batch's extras carry that view's stored teacher output
    (``teacher_output``, float32 ``B x K``)."""

    def __init__(self, dataset: Dataset, seed: int, cache: Any):
        super().__init__(dataset, seed, train=True)
        self.cache = cache

    def _views(self, keys: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
        idx = [int(k[0]) for k in keys]
        return idx, [view_of_epoch(self.seed, int(e), i, self.cache.views) for i, e in keys]

    def __getitem__(self, key: tuple[int, int]) -> Any:  # pragma: no cover - the loader reads whole batches
        return self.__getitems__([key])

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> Batch:
        idx, views = self._views(keys)
        seeds = [view_seed(self.seed, i, v) for i, v in zip(idx, views)]
        batch = as_batch(read_views(self.dataset, idx, seeds))
        batch.extras.update(self.cache.outputs(idx, views))
        return batch
