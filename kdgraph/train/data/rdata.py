"""A standard-library reader of R's lazy-load databases (``.rdx`` index + ``.rdb`` blocks) and XDR serialization.

An installed R package keeps its data sets in ``data/Rdata.rdx`` / ``Rdata.rdb`` (and its functions in
``R/<pkg>.rdx`` / ``.rdb``). The ``.rdx`` is an R object saved with ``saveRDS(compress = TRUE)``: a gzip stream
of an XDR-serialized list whose ``variables`` element maps each object's name to an ``(offset, length)`` pair of
integers into the ``.rdb``. Each ``.rdb`` block is a 4-byte big-endian uncompressed length followed by zlib data
(or, for ``compress = 2`` / ``3``, a type byte ``'2'`` bzip2, ``'X'`` xz, ``'Z'`` zlib, ``'0'`` stored) holding
one XDR-serialized object (R Internals, "Serialization Formats" and "Lazy loading").

Only what data packages hold is decoded: NULL, symbols, pairlists (attributes), logical / integer / double /
character vectors, generic vectors (lists, data frames) and references to symbols read earlier. Anything else
(closures, environments, bytecode) raises :class:`RDataError` naming the R type; nothing is ever evaluated.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = ["RDataError", "RVector", "unserialize", "read_rds", "LazyLoadDB"]

_NIL, _SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC = 0, 1, 2, 9, 10, 13, 14, 16, 19
_REF, _NILVALUE, _GLOBALENV, _EMPTYENV, _BASEENV, _MISSINGARG, _BASENAMESPACE = 255, 254, 253, 242, 241, 251, 247
_NA_INT = -2147483648


class RDataError(ValueError):
    """A file that is not an R serialization this reader decodes (the message says what was found)."""


@dataclass
class RVector:
    """An R vector: its Python values (``None`` for NA) and its attributes (``names``, ``class``, ...)."""

    values: list[Any]
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> Optional[list[Any]]:
        n = self.attributes.get("names")
        return n.values if isinstance(n, RVector) else None

    def as_dict(self) -> dict[str, Any]:
        """A named list (or data frame: its columns) as ``{name: value}``."""
        names = self.names
        if names is None or len(names) != len(self.values):
            raise RDataError("the R list has no names")
        return dict(zip(names, self.values))


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []  # type: ignore[var-annotated]

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RDataError("truncated R serialization")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise RDataError("not an XDR (binary, big-endian) R serialization; only format 'X' is read")
        version = self.int()
        self.int(), self.int()  # R version that wrote it, oldest R version that reads it
        if version == 3:
            self.take(self.int())  # the native encoding's name
        elif version != 2:
            raise RDataError(f"R serialization format version {version} is not read (2 and 3 are)")

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (_NILVALUE, _NIL, _GLOBALENV, _EMPTYENV, _BASEENV, _MISSINGARG, _BASENAMESPACE):
            return None
        if kind == _REF:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _LIST:  # a pairlist: read as {tag: value}, in order
            out: dict[Any, Any] = {}
            while kind == _LIST:
                if has_attr:
                    self.item()  # a pairlist node's own attributes: not kept
                tag = self.item() if has_tag else len(out)
                out[tag] = self.item()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
            if kind not in (_NILVALUE, _NIL):
                raise RDataError(f"a pairlist ends in R type {kind}, not NULL")
            return out
        if kind == _CHAR:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self.take(n)
            latin1 = bool((flags >> 12) & 4)
            return raw.decode("latin-1" if latin1 else "utf-8", errors="replace")
        if kind in (_LGL, _INT):
            n = self.length()
            vals = struct.unpack(f">{n}i", self.take(4 * n))
            out_v: list[Any] = [None if v == _NA_INT else (bool(v) if kind == _LGL else v) for v in vals]
        elif kind == _REAL:
            n = self.length()
            out_v = [None if math.isnan(v) else v for v in struct.unpack(f">{n}d", self.take(8 * n))]
        elif kind in (_STR, _VEC):
            out_v = [self.item() for _ in range(self.length())]
        else:
            raise RDataError(f"R type {kind} (SEXPTYPE) is not a data vector; this reader decodes only NULL, "
                             f"symbols, pairlists and logical / integer / double / character / list vectors")
        attributes = self.item() if has_attr else {}
        return RVector(out_v, {str(k): v for k, v in (attributes or {}).items()})


def unserialize(data: bytes) -> Any:
    """The object of one XDR R serialization (``serialize()`` / an ``.rds`` payload, uncompressed)."""
    r = _Reader(data)
    r.header()
    return r.item()


def read_rds(path: str | Path) -> Any:
    """An ``.rds`` file (gzip-compressed or plain)."""
    raw = Path(path).read_bytes()
    return unserialize(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)


def _inflate(block: bytes) -> bytes:
    size = struct.unpack(">I", block[:4])[0]
    kind = block[4:5]
    try:
        if kind == b"2":
            data = bz2.decompress(block[5:])
        elif kind == b"X":
            data = lzma.decompress(block[5:])
        elif kind == b"0":
            data = block[5:]
        elif kind == b"Z":
            data = zlib.decompress(block[5:])
        else:
            data = zlib.decompress(block[4:])
    except (zlib.error, OSError, lzma.LZMAError) as e:
        raise RDataError(f"an .rdb block does not decompress ({e})") from None
    if len(data) != size:
        raise RDataError(f"an .rdb block holds {len(data)} bytes, its header says {size}")
    return data


class LazyLoadDB:
    """An R lazy-load database ``<base>.rdx`` + ``<base>.rdb``: :attr:`names` and :meth:`get` of each object."""

    def __init__(self, base: str | Path):
        self.base = Path(base)
        self.rdx, self.rdb = self.base.with_suffix(".rdx"), self.base.with_suffix(".rdb")
        index = read_rds(self.rdx)
        if not isinstance(index, RVector):
            raise RDataError(f"{self.rdx}: not an R lazy-load index")
        variables = index.as_dict().get("variables")
        if not isinstance(variables, RVector):
            raise RDataError(f"{self.rdx}: no 'variables' in the lazy-load index")
        self.offsets = {name: tuple(v.values) for name, v in variables.as_dict().items()}

    @property
    def names(self) -> list[str]:
        return list(self.offsets)

    def get(self, name: str) -> Any:
        if name not in self.offsets:
            raise RDataError(f"{self.rdb}: no object {name!r} (it has {', '.join(self.offsets)})")
        offset, length = self.offsets[name]
        with open(self.rdb, "rb") as f:
            f.seek(int(offset))
            block = f.read(int(length))
        return unserialize(_inflate(block))
