"""Training data: ImageNet (ImageFolder), Fashion-MNIST (in memory) and synthetic images.

Every problem with a data folder is a :class:`~kdgraph.errors.DataError` raised here, before any
model is built.

Reproducibility: the sampler yields ``(index, epoch)`` keys and every sample's random
augmentation is seeded by ``(seed, epoch, index)``, so a batch's content depends neither on the
number of DataLoader workers, nor on the world size, nor on where a run was resumed. That is what
makes a resumed run end with the same parameters as an uninterrupted one, and a DDP run see the
same global batches as one process.
"""
from __future__ import annotations

import gzip
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate
from torchvision.datasets import ImageFolder

from ..data import Batch, unpack_batch  # noqa: F401 - part of this module's API
from ..data import wrap as wrap_train_dataset  # noqa: F401 - the spec's data wrapper
from ..errors import DataError
from ..spec import Spec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# --------------------------------------------------------------------------------------------
# Per-sample seeds
# --------------------------------------------------------------------------------------------

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


def _uniform_from_seeds(seeds: torch.Tensor, salt: int) -> torch.Tensor:
    """Vectorised per-sample uniform numbers in [0, 1) from int64 seeds (an xorshift-multiply hash)."""
    x = seeds ^ (salt * 0x2545F4914F6CDD1D)
    x = x ^ (x >> 33)
    x = x * -49064778989728563  # 0xff51afd7ed558ccd as int64
    x = x ^ (x >> 33)
    x = x * -4265267296055464877  # 0xc4ceb9fe1a85ec53 as int64
    x = x ^ (x >> 33)
    return (x & ((1 << 24) - 1)).double() / float(1 << 24)


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class SeededView(Dataset):
    """Reads ``(index, epoch)`` keys; seeds each sample's augmentation by ``(seed, epoch, index)``.

    Datasets with a ``get_batch(indices, seeds)`` method build whole batches in one call (the
    in-memory ones); any other dataset, such as ImageFolder or a data wrapper, is read one item at a
    time under ``torch.random.fork_rng`` with that seed (torchvision's transforms and the CRD
    wrapper draw from torch's global RNG), leaving the process's own RNG untouched.
    """

    def __init__(self, dataset: Dataset, seed: int, train: bool):
        self.dataset, self.seed, self.train = dataset, seed, train

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _seed(self, index: int, epoch: int) -> int:
        return sample_seed(self.seed, epoch, index)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        if not self.train:
            return self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed(index, epoch))
            return self.dataset[index]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> Any:
        if has_batch_reader(self.dataset):
            get_batch = self.dataset.get_batch  # type: ignore[attr-defined]
            idx = [k[0] for k in keys]
            seeds = [self._seed(i, e) for i, e in keys] if self.train else None
            return get_batch(idx, seeds)
        return [self[k] for k in keys]


def has_batch_reader(dataset: Any) -> bool:
    """Whether the dataset's own class builds whole batches (``get_batch``); a wrapper that forwards
    attribute lookups to what it wraps (CRD's) does not count."""
    return callable(getattr(type(dataset), "get_batch", None))


def collate(items: Any) -> Any:
    return items if isinstance(items, Batch) else default_collate(items)


class TensorImages(Dataset):
    """Images held in memory as uint8 ``N x H x W`` (gray), served normalised, optionally augmented.

    Training augmentation (per sample, from its seed): random translation by up to ``pad`` pixels
    (zero padding, as ``RandomCrop(size, padding=pad)``) and horizontal flip. ``size`` resizes
    (bilinear) and ``channels`` repeats the gray channel.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, mean: float, std: float,
                 classes: Sequence[str] = (), size: Optional[tuple[int, int]] = None, channels: int = 1,
                 augment: bool = False, pad: int = 2):
        self.images = images
        self.targets = targets.long()
        self.mean, self.std = mean, std
        self.classes = list(classes)
        self.size = tuple(size) if size else tuple(images.shape[-2:])
        self.channels = channels
        self.augment, self.pad = augment, pad

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, n: Optional[int]) -> "TensorImages":
        if n is None or n >= len(self):
            return self
        return TensorImages(self.images[:n], self.targets[:n], self.mean, self.std, self.classes, self.size,
                            self.channels, self.augment, self.pad)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 B x H x W -> float B x C x h x w, normalised."""
        x = x.unsqueeze(1).float().div_(255.0)
        if tuple(x.shape[-2:]) != self.size:
            x = torch.nn.functional.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        x = x.sub_(self.mean).div_(self.std)
        if self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1).contiguous()
        return x

    def _augment(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        b, h, w = x.shape
        p = self.pad
        if p > 0:
            dy = (_uniform_from_seeds(seeds, 1) * (2 * p + 1)).long()
            dx = (_uniform_from_seeds(seeds, 2) * (2 * p + 1)).long()
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            rows = (torch.arange(h)[None, :] + dy[:, None])[:, :, None]
            cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, :]
            x = padded[torch.arange(b)[:, None, None], rows, cols]
        flip = _uniform_from_seeds(seeds, 3) < 0.5
        if bool(flip.any()):
            x = torch.where(flip[:, None, None], x.flip(-1), x)
        return x

    def get_batch(self, indices: Sequence[int], seeds: Optional[Sequence[int]]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx]
        if self.augment and seeds is not None:
            x = self._augment(x, torch.as_tensor(seeds, dtype=torch.long))
        return Batch(self._finish(x), self.targets[idx])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index: index + 1]
        if self.augment:
            x = self._augment(x, torch.randint(0, 2 ** 62, (1,)))
        return self._finish(x)[0], int(self.targets[index])


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


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# ImageNet (ImageFolder)
# --------------------------------------------------------------------------------------------


def _class_dirs(split_dir: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot list {split_dir}: {e}") from None


def _has_image(folder: Path) -> bool:
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.lower().endswith(IMAGE_EXTENSIONS):
                    return True
                if e.is_dir() and _has_image(Path(e.path)):
                    return True
    except OSError:
        return False
    return False


def check_image_folder(root: Optional[str], num_classes: int) -> Path:
    """Check ImageNet's layout (``ROOT/train/<class>/*.JPEG``, ``ROOT/val/<class>/*.JPEG``) cheaply."""
    layout = "ROOT/train/<class>/<image>.JPEG and ROOT/val/<class>/<image>.JPEG (torchvision ImageFolder layout)"
    if not root:
        raise DataError(f"no ImageNet folder given: pass --data ROOT (or set data.root in the spec) with {layout}")
    r = Path(root).expanduser()
    if not r.is_dir():
        raise DataError(f"data folder {str(r)!r} does not exist; expected {layout}")
    classes: dict[str, list[str]] = {}
    for split in ("train", "val"):
        d = r / split
        if not d.is_dir():
            raise DataError(f"{str(r)!r} has no {split}/ folder; expected {layout}")
        cls = _class_dirs(d)
        if not cls:
            raise DataError(f"{d} has no class folders; expected {layout}. (A flat val/ folder of images must first "
                            f"be sorted into class folders, e.g. with the usual valprep.sh script.)")
        empty = [c for c in cls if not _has_image(d / c)]
        if empty:
            raise DataError(f"{d}: {len(empty)} class folder(s) hold no images ({', '.join(empty[:5])}"
                            f"{', ...' if len(empty) > 5 else ''}); image extensions read: {', '.join(IMAGE_EXTENSIONS)}")
        classes[split] = cls
    if classes["train"] != classes["val"]:
        only_t = sorted(set(classes["train"]) - set(classes["val"]))
        only_v = sorted(set(classes["val"]) - set(classes["train"]))
        raise DataError(f"{r}: train/ and val/ have different class folders (only in train: {only_t[:5]}, "
                        f"only in val: {only_v[:5]}); the label of a class is its position in the sorted list, "
                        f"so both splits need the same folders")
    if len(classes["train"]) != num_classes:
        raise DataError(f"{r}: {len(classes['train'])} class folders but the spec's input.num_classes is "
                        f"{num_classes}; fix one of them (e.g. --set input.num_classes={len(classes['train'])})")
    return r


class UnreadableImageError(DataError):
    """An image file of an ImageFolder that PIL cannot read. Raised in a DataLoader worker, it reaches the main
    process as ``UnreadableImageError("Caught ... Original Traceback ...")``: the original one-line message
    (the traceback's last line) is kept, so the user sees one paragraph."""

    def __init__(self, message: str):
        if "Original Traceback" in message:
            last = [line for line in message.strip().splitlines() if line.strip()][-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


def _read_errors() -> tuple[type, ...]:
    from PIL import Image

    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises for a bad file


class CheckedImageFolder(ImageFolder):
    """torchvision's ImageFolder whose unreadable files are a clear error naming the file, or, with
    ``skip_bad``, replaced by the next readable image of the folder and counted (``skipped``: a
    ``multiprocessing.Value`` shared with DataLoader workers; each one is also reported on stderr).

    The check is lazy, when an image is read: verifying 1.28M headers up front would take minutes."""

    def __init__(self, root: str, transform: Any, skip_bad: bool = False, skipped: Any = None):
        super().__init__(root, transform=transform)
        self.skip_bad, self.skipped = skip_bad, skipped

    def __getitem__(self, index: int) -> Any:
        errors = _read_errors()
        n = len(self.samples)
        for attempt in range(n):
            i = (index + attempt) % n
            path = self.samples[i][0]
            try:
                return super().__getitem__(i)
            except errors as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
                if not self.skip_bad:
                    raise UnreadableImageError(
                        f"{path} is not a readable image ({reason}). Remove or replace the file, or pass "
                        f"--skip-bad-images to kdgraph train to skip unreadable images (they are counted in the "
                        f"run's log).") from None
                if self.skipped is not None:
                    with self.skipped.get_lock():
                        self.skipped.value += 1
                print(f"kdgraph: skipping unreadable image {path} ({reason})", file=sys.stderr, flush=True)
        raise UnreadableImageError(f"{self.root}: no image in this folder is readable")


def imagenet_transforms(size: tuple[int, int], channels: int, train: bool):
    """torchvision's reference ImageNet transforms (RandomResizedCrop + flip / Resize + CenterCrop)."""
    from torchvision import transforms as T

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    pre = []
    if channels == 1:
        pre = [T.Grayscale(1)]
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    if train:
        ops = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        resize = int(round(min(size) * 256 / 224))
        ops = [T.Resize(resize), T.CenterCrop(size)]
    return T.Compose(pre + ops + [T.ToTensor(), T.Normalize(mean, std)])


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


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
        parts = {}
        for split in (("train", "val") if need_train else ("val",)):
            images, labels = load_fashion_mnist(root, split)
            parts[split] = TensorImages(images, labels, FASHION_MEAN, FASHION_STD, FASHION_CLASSES, size, c,
                                        augment=split == "train")
        full = parts.get("train", parts["val"])
        val = parts["val"]
        desc = f"Fashion-MNIST from {find_fashion_mnist(root)}"
    elif ds == "imagenet":
        import multiprocessing

        r = check_image_folder(root, k)
        skipped = multiprocessing.Value("l", 0)
        val = CheckedImageFolder(str(r / "val"), imagenet_transforms(size, c, False), skip_bad_images, skipped)
        full = (CheckedImageFolder(str(r / "train"), imagenet_transforms(size, c, True), skip_bad_images, skipped)
                if need_train else val)
        desc = f"ImageFolder {r}"
    elif ds == "synthetic":
        full = SyntheticImages(spec.data.train_subset or 512, c, size, k, seed=spec.runtime.seed)
        val = SyntheticImages(spec.data.val_subset or 128, c, size, k, seed=spec.runtime.seed + 1)
        desc = "synthetic random images"
    else:  # pragma: no cover - the schema allows only the above
        raise DataError(f"unknown data.dataset {ds!r}")
    train = subset(full, spec.data.train_subset)
    val = subset(val, spec.data.val_subset)
    if len(train) == 0 or len(val) == 0:  # type: ignore[arg-type]
        raise DataError(f"{desc}: empty training or validation split")
    return DataBundle(train, val, k, desc, full, skipped)


def make_loader(dataset: Dataset, *, batch_size: int, train: bool, workers: int, seed: int, world_size: int = 1,
                rank: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``(index, epoch)`` keys: a :class:`ResumableSampler` for training (drop_last),
    a :class:`ShardSampler` for evaluation. In-memory datasets are read in the main process."""
    n = len(dataset)  # type: ignore[arg-type]
    view = SeededView(dataset, seed, train)
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
                      pin_memory=pin_memory, drop_last=train, **kwargs)
