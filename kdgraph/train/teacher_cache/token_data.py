"""Token sequences for the token teacher cache: reading dict batches, and what they and their tokenizer were.

- :class:`TokenArrays`: pre-tokenised sequences from an ``.npz`` file (``input_ids`` N x T, optional
  ``attention_mask`` and ``labels``; missing labels are ``input_ids`` with ``-100`` where the mask is 0), for
  ``kdgraph cache-teacher --sequences FILE``.
- :func:`read_batch`: sequences ``indices`` of any data set whose items (or ``get_batch``) are dicts of tensors.
- :func:`sequences_identity`: count, length, packing and a sha256 of every sequence's ids, mask and labels.
- :func:`tokenizer_identity`: a sha256 of a tokenizer file or folder (names and bytes), or the data set's own
  ``tokenizer_identity()`` (a text data set knows its tokenizer).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from ...errors import TeacherCacheError
from ...methods.token_base import IGNORE_INDEX
from ..data.text import files_identity

__all__ = ["TokenArrays", "read_batch", "sequences_identity", "tokenizer_identity", "kept_counts"]

_BLOCK = 256


class TokenArrays(Dataset):
    """Sequences from an ``.npz`` file of equal-length int arrays (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with np.load(self.path) as z:
                arrays = {k: np.asarray(z[k]) for k in z.files}
        except (OSError, ValueError) as e:
            raise TeacherCacheError(f"--sequences: {self.path} cannot be read as an .npz file of token arrays "
                                    f"({e})") from None
        ids = arrays.get("input_ids")
        if ids is None or ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise TeacherCacheError(f"--sequences: {self.path} must hold 'input_ids', an integer array of shape "
                                    f"[sequences, length]; it holds {sorted(arrays)}")
        mask = arrays.get("attention_mask", np.ones_like(ids))
        labels = arrays.get("labels")
        if labels is None:
            labels = np.where(mask != 0, ids, IGNORE_INDEX)
        for name, a in (("attention_mask", mask), ("labels", labels)):
            if a.shape != ids.shape:
                raise TeacherCacheError(f"--sequences: {self.path}: {name} has shape {list(a.shape)}, input_ids "
                                        f"{list(ids.shape)}; they must be equal")
        self.tensors = {"input_ids": torch.from_numpy(ids.astype(np.int64)),
                        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
                        "labels": torch.from_numpy(labels.astype(np.int64))}

    def __len__(self) -> int:
        return int(self.tensors["input_ids"].shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}

    def get_batch(self, indices: Sequence[int], seeds: Any = None) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {k: v[idx] for k, v in self.tensors.items()}


def read_batch(dataset: Dataset, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Sequences ``indices`` as one dict batch (``input_ids``, ``attention_mask``, ``labels``, ...)."""
    get = getattr(dataset, "get_batch", None)
    batch = get(list(indices), None) if callable(get) else default_collate([dataset[int(i)] for i in indices])
    if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
        what = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise TeacherCacheError(f"data: the training set yields {what}, not token sequences (dicts with "
                                f"input_ids and labels); a token teacher cache needs a text data set or "
                                f"--sequences FILE.npz")
    return batch


def kept_counts(dataset: Dataset, shift: bool = True) -> np.ndarray:
    """Kept tokens of every sequence (labels not -100, after the causal shift)."""
    out = []
    for start in range(0, len(dataset), _BLOCK):  # type: ignore[arg-type]
        lab = read_batch(dataset, range(start, min(start + _BLOCK, len(dataset))))["labels"]  # type: ignore
        lab = lab[:, 1:] if shift else lab
        out.append((lab != IGNORE_INDEX).sum(1).numpy())
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def sequences_identity(dataset: Dataset) -> dict[str, Any]:
    """Number and length of the sequences, their packing and a sha256 of their ids, masks and labels."""
    h, n, seq_len = hashlib.sha256(), len(dataset), None  # type: ignore[arg-type]
    for start in range(0, n, _BLOCK):
        b = read_batch(dataset, range(start, min(start + _BLOCK, n)))
        seq_len = int(b["input_ids"].shape[1])
        for key in ("input_ids", "attention_mask", "labels"):
            if key in b:
                h.update(key.encode())
                h.update(b[key].to(torch.int64).contiguous().numpy().tobytes())
    packing = getattr(dataset, "packing_identity", None)
    return {"kind": type(dataset).__name__, "sequences": n, "seq_len": seq_len,
            "packing": packing() if callable(packing) else None, "sha256": h.hexdigest()}


def tokenizer_identity(path: Optional[str | Path], dataset: Any = None) -> Optional[dict[str, Any]]:
    """What the tokenizer was: a file or folder's sha256 (names and contents), else the data set's own record."""
    if path is None:
        own = getattr(dataset, "tokenizer_identity", None)
        return own() if callable(own) else None
    p = Path(path).expanduser()
    if not p.exists():
        raise TeacherCacheError(f"--tokenizer: {p} does not exist; give the tokenizer's file or folder")
    return files_identity(p)
