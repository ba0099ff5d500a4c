"""The data a spec names, built: the training / validation datasets (:class:`DataBundle`), cheap checks
before any model is built (:func:`check_data`), and the DataLoaders over ``(index, epoch)`` keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch.utils.data import DataLoader, Dataset, Sampler

from ...errors import DataError
from ...spec import Spec
from .fashion_mnist import TensorImages, fashion_mnist_datasets, find_fashion_mnist
from .glue import GLUE_TASKS, find_glue, glue_datasets
from .image_folder import check_image_folder, image_folder_datasets
from .sampling import ResumableSampler, SeededView, ShardSampler, collate, has_batch_reader
from .synthetic import synthetic_datasets

__all__ = ["DataBundle", "subset", "check_data", "build_datasets", "make_loader"]


@dataclass
class DataBundle:
    train: Dataset  # data.train_subset applied, without the data wrapper
    val: Dataset
    num_classes: int
    description: str
    train_full: Optional[Dataset] = None  # the whole training split (pretraining may use more than train)
    skipped: Any = None  # ImageFolder: a multiprocessing.Value counting unreadable images skipped

    def __post_init__(self) -> None:
        if self.train_full is None:
            self.train_full = self.train


def subset(dataset: Dataset, n: Optional[int]) -> Dataset:
    """The first ``n`` items (all when ``n`` is None or larger than the data set)."""
    if n is None or n >= len(dataset):  # type: ignore[arg-type]
        return dataset
    if isinstance(dataset, TensorImages):
        return dataset.subset(n)
    from torch.utils.data import Subset

    return Subset(dataset, range(n))


def check_data(spec: Spec, root: Optional[str] = None) -> None:
    """Cheap checks of the data the spec names (raises DataError); nothing is loaded."""
    root = root if root is not None else spec.data.root
    if spec.data.dataset == "imagenet":
        check_image_folder(root, spec.input.num_classes)
    elif spec.data.dataset == "fashion_mnist":
        find_fashion_mnist(root)
        if spec.input.num_classes != 10:
            raise DataError(f"Fashion-MNIST has 10 classes but the spec's input.num_classes is "
                            f"{spec.input.num_classes}")
    elif spec.data.dataset == "text":
        from .text import text_batch_keys

        text_batch_keys(list(spec.input.named), spec.data.text.packing)
    elif spec.data.dataset == "glue":
        task = str(spec.data.task)
        find_glue(root, task)
        if spec.input.num_classes != GLUE_TASKS[task][2]:
            raise DataError(f"{spec.where('input', 'num_classes')}: GLUE {task} has {GLUE_TASKS[task][2]} "
                            f"{'output (a regression score)' if task == 'stsb' else 'classes'} but the spec says "
                            f"{spec.input.num_classes}")


def build_datasets(spec: Spec, root: Optional[str] = None, need_train: bool = True,
                   skip_bad_images: bool = False) -> DataBundle:
    """The training and validation datasets the spec names (``data.dataset``, subsets applied).

    ``skip_bad_images``: unreadable ImageFolder files are skipped and counted (``bundle.skipped``) instead of
    stopping with an error naming the file."""
    root = root if root is not None else spec.data.root
    skipped = None
    c, size, k = spec.input.channels, tuple(spec.input.size), spec.input.num_classes
    ds = spec.data.dataset
    if ds == "fashion_mnist":
        check_data(spec, root)
        full, val, desc = fashion_mnist_datasets(root, size, c, need_train, spec.data.augment)
    elif ds == "imagenet":
        full, val, desc, skipped = image_folder_datasets(root, k, size, c, need_train, skip_bad_images,
                                                         spec.data.augment)
    elif ds == "glue":
        check_data(spec, root)
        d = spec.data
        full, val, desc = glue_datasets(root, str(d.task), d.tokenizer, d.max_length, d.padding, need_train,
                                        pad_to_multiple_of=d.pad_to_multiple_of)
    elif ds == "text":
        from .text import text_datasets

        check_data(spec, root)
        full, val, desc, k = text_datasets(spec, need_train)
    elif ds == "synthetic":
        full, val, desc = synthetic_datasets(spec.data.train_subset, spec.data.val_subset, c, size, k,
                                             spec.runtime.seed)
    else:  # pragma: no cover - the schema allows only the above
        raise DataError(f"unknown data.dataset {ds!r}")
    held = spec.data.holdout
    train_part = full
    if held is not None and need_train:  # validate on training images held out (kdgraph tune), not on the evaluation split
        from .holdout import split_holdout

        train_part, val, _, held_idx = split_holdout(full, held.count, held.fraction, held.seed, size, c)
        desc += f", validated on {len(held_idx)} held-out training images (data.holdout, seed {held.seed})"
    train = subset(train_part, spec.data.train_subset)
    val = subset(val, spec.data.val_subset)
    if len(train) == 0 or len(val) == 0:  # type: ignore[arg-type]
        raise DataError(f"{desc}: empty training or validation split")
    return DataBundle(train, val, k, desc, full, skipped)


def make_loader(dataset: Dataset, *, batch_size: int, train: bool, workers: int, seed: int, world_size: int = 1,
                rank: int = 0, pin_memory: bool = False, view: Optional[Dataset] = None,
                drop_last: bool = True) -> DataLoader:
    """A DataLoader over ``(index, epoch)`` keys: a :class:`ResumableSampler` for training (its last partial
    batch dropped unless ``drop_last`` is False), a :class:`ShardSampler` for evaluation. In-memory datasets are
    read in the main process. ``view``: the keyed view over ``dataset`` to read instead of a :class:`SeededView`
    (teacher cache replay, data.augment's mixing)."""
    n = len(dataset)  # type: ignore[arg-type]
    view = view if view is not None else SeededView(dataset, seed, train)
    if train:
        sampler: Sampler = ResumableSampler(n, world_size, rank, shuffle=True, seed=seed, drop_last=True)
        if n // world_size < batch_size:
            raise DataError(f"the training set has {n} images, fewer than one batch of {batch_size} per process "
                            f"x {world_size} process(es); lower batch_size or use more data")
    else:
        sampler = ShardSampler(n, world_size, rank)
    in_memory = has_batch_reader(dataset)
    workers = 0 if in_memory else workers
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    return DataLoader(view, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, drop_last=train and drop_last, **kwargs)
