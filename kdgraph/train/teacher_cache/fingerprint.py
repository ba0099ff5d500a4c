"""What a teacher cache was made from, as plain data: the spec's teacher side, the teacher's weights, the training
images and their augmentation. :mod:`.store` writes these into the manifest and refuses a cache whose record
differs from the run about to use it.

- :func:`spec_identity`: the spec fields the stored outputs depend on (teacher model and kwargs, input, data set
  and subset, seed); a student, loss or schedule change keeps the cache valid.
- :func:`teacher_weights_sha256`: sha256 over the teacher's state_dict (names, dtypes, shapes, bytes).
- :func:`data_identity`: the training split (kind, number of images, a sha256 of the in-memory images and labels
  or of an image folder's file list) and :func:`transform_identity`, its random training transform.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ...spec import Spec
from ..data import SyntheticImages, TensorImages

__all__ = ["canonical_hash", "spec_identity", "teacher_weights_sha256", "data_identity", "transform_identity",
           "view_params"]


def canonical_hash(obj: Any) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def spec_identity(spec: Spec) -> dict[str, Any]:
    """The spec fields that decide the cached teacher outputs (the rest of the spec may change freely)."""
    return {"teacher": {"model": spec.teacher.model, "kwargs": spec.teacher.kwargs},
            "input": spec.input.model_dump(mode="json", include={"channels", "size", "num_classes"}),
            "data": {"dataset": spec.data.dataset, "train_subset": spec.data.train_subset},
            "seed": spec.runtime.seed}


def teacher_weights_sha256(teacher: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        if hasattr(t, "full_tensor"):  # a sharded (FSDP2) teacher: its whole tensor (every process calls this)
            t = t.full_tensor()
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _base(dataset: Dataset) -> tuple[Dataset, int]:
    """(the dataset under a ``Subset(range(n))``, n)."""
    n = len(dataset)  # type: ignore[arg-type]
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset, n


def data_identity(dataset: Dataset, root: Any = None) -> dict[str, Any]:
    """Kind, root (recorded, not compared), number of images and a sha256 of the training split's content."""
    base, n = _base(dataset)
    h = hashlib.sha256()
    if isinstance(base, TensorImages):
        kind = "in-memory images"
        h.update(base.images[:n].contiguous().numpy().tobytes())
        h.update(base.targets[:n].contiguous().numpy().tobytes())
    elif isinstance(base, SyntheticImages):
        kind = "synthetic"
        h.update(json.dumps([base.length, base.channels, list(base.size), base.num_classes, base.seed]).encode())
    elif hasattr(base, "samples"):  # an ImageFolder: the file list and labels, relative to its root
        kind = "image folder"
        prefix = len(str(getattr(base, "root", "")))
        for path, label in base.samples[:n]:
            h.update(f"{str(path)[prefix:]}\t{label}\n".encode())
    else:
        kind = type(base).__name__
        h.update(f"{kind}:{n}".encode())
    return {"kind": kind, "root": None if root is None else str(root), "images": n, "sha256": h.hexdigest()}


def transform_identity(dataset: Dataset) -> dict[str, Any]:
    """The training split's random transform: its parameters (in-memory sets) or its torchvision ``repr``."""
    base, _ = _base(dataset)
    if isinstance(base, TensorImages):
        extra = {} if base.extra is None else {"data_augment": base.extra.identity()}  # spec data.augment
        return {"type": "translate+hflip", "augment": base.augment, "pad": base.pad,
                "hflip": 0.5 if base.extra is None else base.extra.hflip, "size": list(base.size),
                "channels": base.channels, "mean": base.mean, "std": base.std, "params": ["dy", "dx", "flip"],
                **extra}
    if isinstance(base, SyntheticImages):
        return {"type": "none", "params": []}
    tf = getattr(base, "transform", None)
    return {"type": "torchvision", "repr": repr(tf), "params": ["top", "left", "height", "width", "flip"]
            if _crop_and_flip(tf) is not None else []}


def _crop_and_flip(tf: Any) -> Any:
    ops = list(getattr(tf, "transforms", []))
    from torchvision import transforms as T

    crops = [o for o in ops if isinstance(o, T.RandomResizedCrop)]
    flips = [o for o in ops if isinstance(o, T.RandomHorizontalFlip)]
    randoms = [o for o in ops if type(o).__name__.startswith("Random")]
    if len(crops) == 1 and len(flips) == 1 and len(randoms) == 2 and ops.index(crops[0]) < ops.index(flips[0]):
        return crops[0], flips[0]
    return None


def view_params(dataset: Dataset, indices: list[int], seeds: list[int]) -> torch.Tensor:
    """The random parameters each seed gives (``int32 B x P``, named by :func:`transform_identity`'s ``params``):
    recorded beside the seeds so a person (or another tool) can see every stored view's crop and flip."""
    from ..data.sampling import uniform_from_seeds

    base, _ = _base(dataset)
    if isinstance(base, TensorImages):
        s = torch.as_tensor(seeds, dtype=torch.long)
        p = base.pad
        dy = (uniform_from_seeds(s, 1) * (2 * p + 1)).long() - p
        dx = (uniform_from_seeds(s, 2) * (2 * p + 1)).long() - p
        flip = (uniform_from_seeds(s, 3) < (0.5 if base.extra is None else base.extra.hflip)).long()
        if not base.augment:
            dy, dx, flip = dy * 0, dx * 0, flip * 0
        return torch.stack([dy, dx, flip], dim=1).int()
    pair = _crop_and_flip(getattr(base, "transform", None))
    if pair is None or not hasattr(base, "samples"):
        return torch.zeros(len(indices), 0, dtype=torch.int32)
    from PIL import Image

    crop, flip = pair
    rows = []
    for i, s in zip(indices, seeds):
        with Image.open(base.samples[i][0]) as im:  # the header only: the size, no decoding
            size = im.size
        with torch.random.fork_rng(devices=[]):  # the same draws, in the same order, as the transform's
            torch.default_generator.manual_seed(int(s))
            top, left, h, w = crop.get_params(Image.new("L", size), crop.scale, crop.ratio)
            flipped = int(torch.rand(1) < flip.p)
        rows.append([top, left, h, w, flipped])
    return torch.tensor(rows, dtype=torch.int32)
