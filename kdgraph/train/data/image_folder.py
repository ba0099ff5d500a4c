"""ImageNet-style folders (``data.dataset: imagenet``): the layout checked cheaply up front, images read by
:class:`CheckedImageFolder` (an unreadable file is a clear error naming it, or skipped and counted), with
torchvision's reference ImageNet transforms.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

from torchvision.datasets import ImageFolder

from ...errors import DataError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "check_image_folder", "UnreadableImageError",
           "CheckedImageFolder", "imagenet_transforms", "image_folder_datasets"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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
            path, target = self.samples[i]
            try:  # only the file's reading and decoding: a transform's own error is not an unreadable image
                sample = self.loader(path)
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
                continue
            if self.transform is not None:
                sample = self.transform(sample)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return sample, target
        raise UnreadableImageError(f"{self.root}: no image in this folder is readable")


def imagenet_transforms(size: tuple[int, int], channels: int, train: bool, augment: Any = None):
    """torchvision's reference ImageNet transforms (RandomResizedCrop + flip / Resize + CenterCrop); with
    ``augment`` (the spec's ``data.augment``), :func:`.augment.folder_transforms`."""
    from torchvision import transforms as T

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    pre = []
    if channels == 1:
        pre = [T.Grayscale(1)]
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    if augment is not None:
        from .augment import folder_transforms

        return folder_transforms(size, channels, train, augment, mean, std)
    if train:
        ops = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        resize = int(round(min(size) * 256 / 224))
        ops = [T.Resize(resize), T.CenterCrop(size)]
    return T.Compose(pre + ops + [T.ToTensor(), T.Normalize(mean, std)])


def image_folder_datasets(root: Optional[str], num_classes: int, size: tuple[int, int], channels: int,
                          need_train: bool = True, skip_bad: bool = False,
                          augment: Any = None) -> tuple[Any, Any, str, Any]:
    """(training split, validation split, description, skipped-images counter) of an ImageNet-style folder;
    the validation split alone when ``need_train`` is False (then it stands for both). The counter is a
    ``multiprocessing.Value`` shared with DataLoader workers."""
    import multiprocessing

    r = check_image_folder(root, num_classes)
    skipped = multiprocessing.Value("l", 0)
    val = CheckedImageFolder(str(r / "val"), imagenet_transforms(size, channels, False, augment), skip_bad, skipped)
    train = (CheckedImageFolder(str(r / "train"), imagenet_transforms(size, channels, True, augment), skip_bad, skipped)
             if need_train else val)
    return train, val, f"ImageFolder {r}", skipped
