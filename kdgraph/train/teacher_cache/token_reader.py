"""Reading a token (top-K) teacher cache: :func:`open_token_cache` checks it (fingerprint, completeness, sizes and
sha256 of every file) and :class:`TokenCacheReader` gives the sparse teacher of a batch of sequences, the value the
fused graph reads for the cached tap (batch key ``teacher_output``); :class:`TokenReplayView` adds it to the dict
batches of a token data set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ...compiler.cached import TEACHER_OUTPUT_KEY
from ...methods.token_sparse import SparseTeacher
from .bitpack import unpack_ids
from .store import checked_manifest, load_shards
from .token_data import read_batch
from .token_layout import TOKEN_CHECKED

__all__ = ["TokenCacheReader", "open_token_cache", "TokenReplayView"]


class TokenCacheReader:
    """A complete, checked token cache, memory-mapped."""

    def __init__(self, folder: Path, manifest: dict[str, Any], shards: list[dict[str, np.ndarray]]):
        self.folder, self.manifest, self.shards = folder, manifest, shards
        self.world, self.topk = int(manifest["world_size"]), int(manifest["topk"])
        self.bits, self.vocab_size = int(manifest["id_bits"]), int(manifest["vocab_size"])
        self.temperature, self.shift = float(manifest["temperature"]), bool(manifest["shift"])
        self.views = 1

    def sparse(self, indices: Sequence[int]) -> SparseTeacher:
        """The kept tokens of sequences ``indices``, concatenated in that order (the loss's mask order)."""
        ids, logp, tail, lengths = [], [], [], []
        for i in indices:
            arrays = self.shards[int(i) % self.world]
            row = int(i) // self.world
            a, b = int(arrays["offsets"][row]), int(arrays["offsets"][row + 1])
            lengths.append(b - a)
            ids.append(unpack_ids(arrays["ids"][a:b], self.topk, self.bits))
            logp.append(np.asarray(arrays["logp"][a:b]))
            tail.append(np.asarray(arrays["tail"][a:b]))
        cat = (lambda xs, like: np.concatenate(xs) if xs else like)
        ids_t = torch.from_numpy(cat(ids, np.zeros((0, self.topk), np.int64)))
        logp_t = torch.from_numpy(cat(logp, np.zeros((0, self.topk), np.uint16)).view(np.int16)).view(torch.bfloat16)
        tail_t = torch.from_numpy(cat(tail, np.zeros(0, np.float32)).copy())
        return SparseTeacher(ids_t, logp_t, tail_t, self.vocab_size, self.temperature, self.shift,
                             torch.tensor(lengths, dtype=torch.long))

    def outputs(self, indices: Sequence[int], views: Any = None) -> dict[str, SparseTeacher]:
        return {TEACHER_OUTPUT_KEY: self.sparse(indices)}


def open_token_cache(folder: Path, expected: dict[str, Any], where: str,
                     topk: Optional[int] = None) -> TokenCacheReader:
    """The token cache in ``folder``, refused (one paragraph naming what differs) unless it was made from what
    ``expected`` (:func:`~.tokens.describe_tokens` of this run) describes, with ``topk`` if given, and is complete
    and intact."""
    fields = TOKEN_CHECKED + (((("topk",), "K (the top-K size)"),) if topk is not None else ())
    manifest = checked_manifest(folder, {**expected, "topk": topk}, where, fields=fields)
    return TokenCacheReader(folder, manifest, load_shards(folder, manifest, where))


class TokenReplayView(Dataset):
    """A token data set whose batches (``get_batch`` / ``__getitems__``) also carry the cached sparse teacher."""

    def __init__(self, dataset: Dataset, cache: TokenCacheReader):
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitems__(self, keys: Sequence[Any]) -> dict[str, Any]:
        """Sequences ``keys`` (indices, or the training loader's ``(index, epoch)`` keys: a token cache holds one
        record per sequence, every epoch reads the same) with their sparse teacher under ``teacher_output``."""
        indices = [int(k[0]) if isinstance(k, (tuple, list)) else int(k) for k in keys]
        batch = dict(read_batch(self.dataset, indices))
        batch.update(self.cache.outputs(indices))
        return batch

    def get_batch(self, indices: Sequence[int], seeds: Any = None) -> dict[str, Any]:
        return self.__getitems__(indices)

    def __getitem__(self, index: int) -> dict[str, Any]:  # pragma: no cover - the loader reads whole batches
        return self.__getitems__([index])
