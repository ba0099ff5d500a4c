"""Fashion-MNIST (``data.dataset: fashion_mnist``): the IDX files found and parsed, held in memory as
:class:`TensorImages` (served normalised, augmented per sample from its seed, whole batches at a time).

Every problem with the files is a :class:`~kdgraph.errors.DataError` saying how to get them.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import Dataset

from ...distiller.data import Batch
from ...errors import DataError
from .sampling import uniform_from_seeds

__all__ = ["FASHION_MEAN", "FASHION_STD", "FASHION_CLASSES", "FASHION_HELP", "DEBIAN_FASHION_DIR", "TensorImages",
           "find_fashion_mnist", "load_fashion_mnist", "fashion_mnist_datasets"]

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class TensorImages(Dataset):
    """Images held in memory as uint8 ``N x H x W`` (gray), served normalised, optionally augmented.

    Training augmentation (per sample, from its seed): random translation by up to ``pad`` pixels
    (zero padding, as ``RandomCrop(size, padding=pad)``) and horizontal flip. ``size`` resizes
    (bilinear) and ``channels`` repeats the gray channel. ``extra``: the spec's ``data.augment`` built
    (:class:`~kdgraph.train.data.augment.ImageAugment`): a per-sample policy after the flip, random erasing after
    normalisation (training only), its flip probability and its resize interpolation.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, mean: float, std: float,
                 classes: Sequence[str] = (), size: Optional[tuple[int, int]] = None, channels: int = 1,
                 augment: bool = False, pad: int = 2, extra: Any = None):
        self.images = images
        self.targets = targets.long()
        self.mean, self.std = mean, std
        self.classes = list(classes)
        self.size = tuple(size) if size else tuple(images.shape[-2:])
        self.channels = channels
        self.augment, self.pad = augment, pad
        self.extra = extra  # data.augment: an augment.ImageAugment (policy, erasing, flip probability, interpolation)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, n: Optional[int]) -> "TensorImages":
        if n is None or n >= len(self):
            return self
        return TensorImages(self.images[:n], self.targets[:n], self.mean, self.std, self.classes, self.size,
                            self.channels, self.augment, self.pad, self.extra)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 B x H x W -> float B x C x h x w, normalised."""
        x = x.unsqueeze(1).float().div_(255.0)
        if tuple(x.shape[-2:]) != self.size:
            mode = self.extra.interpolation if self.extra is not None else "bilinear"
            x = torch.nn.functional.interpolate(x, size=self.size, mode=mode,
                                                align_corners=None if mode == "nearest" else False)
        x = x.sub_(self.mean).div_(self.std)
        if self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1).contiguous()
        return x

    def _augment(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        b, h, w = x.shape
        p = self.pad
        if p > 0:
            dy = (uniform_from_seeds(seeds, 1) * (2 * p + 1)).long()
            dx = (uniform_from_seeds(seeds, 2) * (2 * p + 1)).long()
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            rows = (torch.arange(h)[None, :] + dy[:, None])[:, :, None]
            cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, :]
            x = padded[torch.arange(b)[:, None, None], rows, cols]
        flip = uniform_from_seeds(seeds, 3) < (self.extra.hflip if self.extra is not None else 0.5)
        if bool(flip.any()):
            x = torch.where(flip[:, None, None], x.flip(-1), x)
        return x if self.extra is None else self.extra.pre(x, seeds)

    def get_batch(self, indices: Sequence[int], seeds: Optional[Sequence[int]]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx]
        s = torch.as_tensor(seeds, dtype=torch.long) if self.augment and seeds is not None else None
        if s is not None:
            x = self._augment(x, s)
        x = self._finish(x)
        if s is not None and self.extra is not None:
            x = self.extra.post(x, s)
        return Batch(x, self.targets[idx])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index: index + 1]
        s = torch.randint(0, 2 ** 62, (1,)) if self.augment else None
        if s is not None:
            x = self._augment(x, s)
        x = self._finish(x)
        if s is not None and self.extra is not None:
            x = self.extra.post(x, s)
        return x[0], int(self.targets[index])


def _read_idx(path: Path, expect_magic: int) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:  # type: ignore[operator]
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(data) < 8:
        raise DataError(f"{path} is not an IDX file (only {len(data)} bytes)")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expect_magic:
        raise DataError(f"{path} is not an IDX {'image' if expect_magic == 2051 else 'label'} file "
                        f"(magic number {magic:#x}, expected {expect_magic:#x})")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    n = 1
    for d in dims:
        n *= d
    body = data[4 + 4 * ndim:]
    if len(body) != n:
        raise DataError(f"{path} is truncated or malformed: header says {dims} ({n} bytes), file has {len(body)}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def _fashion_candidates(root: Optional[str]) -> list[Path]:
    if root:
        r = Path(root).expanduser()
        return [r / "FashionMNIST" / "raw", r / "raw", r]
    return [Path("data/FashionMNIST/raw"), DEBIAN_FASHION_DIR]


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


FASHION_HELP = (
    "Get it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; the files go to "
    "/usr/share/datasets/fashion-mnist/), or put the four files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (gunzipped or .gz, as torchvision's FashionMNIST keeps them) "
    "under ROOT/FashionMNIST/raw/ and pass --data ROOT.")


def find_fashion_mnist(root: Optional[str]) -> Path:
    """The folder holding the Fashion-MNIST IDX files, or a DataError saying how to get them."""
    looked = _fashion_candidates(root)
    for folder in looked:
        if all(_find_idx(folder, s) for pair in _FASHION_FILES.values() for s in pair):
            return folder
    partial = [f for f in looked if f.is_dir() and any(_find_idx(f, s) for p in _FASHION_FILES.values() for s in p)]
    if partial:
        missing = [s for p in _FASHION_FILES.values() for s in p if not _find_idx(partial[0], s)]
        raise DataError(f"Fashion-MNIST in {partial[0]} is incomplete: missing {', '.join(missing)}. {FASHION_HELP}")
    raise DataError(f"Fashion-MNIST not found (looked in {', '.join(str(p) for p in looked)}). {FASHION_HELP}")


_IDX_CACHE: dict[tuple[str, float, int], torch.Tensor] = {}


def _read_idx_cached(path: Path, magic: int) -> torch.Tensor:
    """Parsed IDX files are kept per (path, mtime, size): several runs in one process read them once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime, st.st_size)
    if key not in _IDX_CACHE:
        if len(_IDX_CACHE) >= 8:
            _IDX_CACHE.clear()
        _IDX_CACHE[key] = _read_idx(path, magic)
    return _IDX_CACHE[key]


def load_fashion_mnist(root: Optional[str], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    folder = find_fashion_mnist(root)
    img_stem, lbl_stem = _FASHION_FILES[split]
    images = _read_idx_cached(_find_idx(folder, img_stem), 2051)  # type: ignore[arg-type]
    labels = _read_idx_cached(_find_idx(folder, lbl_stem), 2049)  # type: ignore[arg-type]
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"Fashion-MNIST {split} files in {folder} disagree: images {tuple(images.shape)}, "
                        f"labels {tuple(labels.shape)}")
    if int(labels.max()) >= 10:
        raise DataError(f"Fashion-MNIST {split} labels in {folder} go up to {int(labels.max())}; expected 0-9")
    return images, labels.long()


def fashion_mnist_datasets(root: Optional[str], size: tuple[int, int], channels: int,
                           need_train: bool = True, augment: Any = None) -> tuple[Dataset, Dataset, str]:
    """(whole training split, validation split, description); the training split augmented, and the
    validation split alone when ``need_train`` is False (then it stands for both). ``augment``: the spec's
    ``data.augment`` (an AugmentSpec) or None."""
    extra = None
    if augment is not None:
        from .augment import ImageAugment

        extra = ImageAugment(augment)
    parts = {}
    for split in (("train", "val") if need_train else ("val",)):
        images, labels = load_fashion_mnist(root, split)
        parts[split] = TensorImages(images, labels, FASHION_MEAN, FASHION_STD, FASHION_CLASSES, size, channels,
                                    augment=split == "train", extra=extra)  # val: only its interpolation
    return parts.get("train", parts["val"]), parts["val"], f"Fashion-MNIST from {find_fashion_mnist(root)}"
