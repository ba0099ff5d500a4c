"""Fixed-width bit packing of token ids: ``N x K`` ids below ``2**bits`` <-> ``N x ceil(K * bits / 8)`` bytes.

A vocabulary of ``V`` tokens needs ``bits = ceil(log2 V)`` bits per id (SmolLM2's 49,152: 16; Llama-3's 128,256:
17; Qwen2.5's 151,936: 18), against 32 in an ``int32``. Each row is packed on its own
(little-endian bit order: bit ``j`` of id ``k`` is bit ``k * bits + j`` of the row), so rows can be read one by one
from a memory map. Pure numpy, vectorised over the rows.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["id_bits", "packed_bytes", "pack_ids", "unpack_ids"]

MAX_BITS = 24


def id_bits(vocab_size: int) -> int:
    """Bits per id of a ``vocab_size``-word vocabulary (at least 1)."""
    return max(1, math.ceil(math.log2(max(int(vocab_size), 2))))


def packed_bytes(k: int, bits: int) -> int:
    """Bytes of one packed row of ``k`` ids."""
    return (k * bits + 7) // 8


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """``N x K`` non-negative ids (< ``2**bits``) -> ``uint8 N x packed_bytes(K, bits)``."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be 1..{MAX_BITS}, got {bits}")
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= (1 << bits)):
        raise ValueError(f"ids must lie in [0, 2**{bits}), got [{ids.min()}, {ids.max()}]")
    n, k = ids.shape
    shifts = np.arange(bits, dtype=np.uint32)
    bitmat = ((ids.astype(np.uint32)[:, :, None] >> shifts) & 1).astype(np.uint8).reshape(n, k * bits)
    return np.packbits(bitmat, axis=1, bitorder="little")


def unpack_ids(packed: np.ndarray, k: int, bits: int) -> np.ndarray:
    """The inverse of :func:`pack_ids`: ``uint8 N x packed_bytes(k, bits)`` -> ``int64 N x k``."""
    packed = np.asarray(packed, dtype=np.uint8)
    n = packed.shape[0]
    bitmat = np.unpackbits(packed, axis=1, count=k * bits, bitorder="little").reshape(n, k, bits)
    weights = (np.uint32(1) << np.arange(bits, dtype=np.uint32)).astype(np.int64)
    return (bitmat.astype(np.int64) * weights).sum(axis=2)
