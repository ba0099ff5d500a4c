"""The files of a token (top-K) teacher cache and the manifest fields it is checked on.

One shard per rank; rank ``r`` of ``W`` holds sequences ``r, r + W, ...`` and, for each, only its kept tokens
(labels not ``-100`` after the causal shift), one row per token, in sequence order::

    DIR/rankRRR-of-WWW.ids.npy       uint8   N_r x ceil(K * bits / 8)   the top-K ids, bit-packed (bitpack.py)
    DIR/rankRRR-of-WWW.logp.npy      uint16  N_r x K                    log p_t,k at the temperature, bf16 bits
    DIR/rankRRR-of-WWW.tail.npy      float32 N_r                        1 - sum_k p_t,k
    DIR/rankRRR-of-WWW.offsets.npy   int64   rows + 1                   sequence i's tokens: offsets[i]:offsets[i+1]

So a kept token costs ``ceil(K * bits / 8) + 2 K + 4`` bytes (K = 128: 516 at 16 bits, vocabularies up to 65,536
such as SmolLM2's 49,152; 532 at 17 bits; 548 at 18).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .bitpack import packed_bytes

__all__ = ["token_layout", "bytes_per_token", "TOKEN_CHECKED", "TOKEN_RUN"]

#: (manifest key path, what it is for people): a cache that differs on one of these is refused
TOKEN_CHECKED = (
    (("format",), "format"), (("version",), "format version"), (("kind",), "cache kind"),
    (("tap",), "the cached tap (runtime.teacher_cache_tap)"),
    (("identity", "teacher", "model"), "teacher.model"), (("identity", "teacher", "kwargs"), "teacher.kwargs"),
    (("identity", "input"), "input.named"),
    (("teacher_weights_sha256",), "the teacher's weights (sha256 of its state_dict)"),
    (("tokenizer",), "the tokenizer"),
    (("data", "sequences"), "the number of training sequences"),
    (("data", "seq_len"), "the sequence length (max_length)"), (("data", "packing"), "the packing"),
    (("data", "sha256"), "the training sequences (sha256 of ids, mask and labels)"),
    (("vocab_size",), "the vocabulary size"), (("shift",), "the causal shift"))
#: checked when a run continues writing a cache (a reader takes K and T from the cache and checks the loss)
TOKEN_RUN = ((("topk",), "--topk (K)"), (("temperature",), "--temperature"),
             (("world_size",), "the number of processes"))


def bytes_per_token(k: int, bits: int) -> int:
    return packed_bytes(k, bits) + 2 * k + 4


def token_layout(manifest: dict[str, Any], rows: int, rank: int) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """name -> (dtype, shape) of rank ``rank``'s shard."""
    k, bits = int(manifest["topk"]), int(manifest["id_bits"])
    n = int(manifest["shard_tokens"][rank])
    return {"ids": (np.uint8, (n, packed_bytes(k, bits))), "logp": (np.uint16, (n, k)),
            "tail": (np.float32, (n,)), "offsets": (np.int64, (rows + 1,))}
