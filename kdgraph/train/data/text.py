"""Text for causal LMs (``data.dataset: text``): documents tokenised, held out by document, cut into rows.

1. **Documents** come from :mod:`.text_sources` (files, JSONL, Austen, KJV).
2. **Held out by document** (:func:`split_documents`): ``data.text.validation`` picks whole documents (chapters,
   files, lines) per book, before any tokenisation, so no validation text is ever trained on.
3. **Tokenised** by a local tokenizer (:func:`load_text_tokenizer`: a ``save_pretrained`` folder, or a GGUF
   file through transformers' ``gguf_file=``; nothing is downloaded), without special tokens, then EOS appended
   (``add_eos``). A prompt's tokens get label -100.
4. **Cut** into pieces of at most ``max_length`` tokens; a piece's first label is -100 (nothing before it in its
   row predicts it), pieces with no scored token after it are dropped.
5. **Rows** of ``max_length`` tokens: unpacked, one piece per row, padded at the end (``attention_mask`` 0, labels
   -100); packed, consecutive pieces filled into a row while they fit (no piece is split across rows), the tail
   padded as one more pseudo-document. Packed rows carry ``position_ids`` restarting at 0 at each piece and **no**
   ``attention_mask``: transformers' mask builder (``masking_utils.find_packed_sequence_indices``) then makes the
   causal mask block-diagonal per document, in eager mode and in a graph captured by ``torch.export`` (checked for
   Llama and GPT-2: logits equal to the documents run alone). Labels -100 at each piece's first token mean no
   token is predicted across documents, so a packed batch and the same pieces unpacked give the same token loss.

A batch is a dict with the spec's named inputs and ``labels`` (the input ids, -100 where not scored; the token
losses shift them, :mod:`kdgraph.methods.token_base`).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import Dataset

from ...errors import DataError
from .text_sources import Document, read_source

__all__ = ["IGNORE_INDEX", "tokenizer_file", "files_identity", "load_text_tokenizer", "split_documents",
           "encode_documents", "pack_pieces", "TextRows", "text_datasets", "text_batch_keys"]

IGNORE_INDEX = -100
_SINGLES = "(single-document books)"


def tokenizer_file(path: Optional[str]) -> Path:
    """The local tokenizer folder or file ``data.tokenizer`` names (``pkg:PACKAGE/FILE`` resolved inside the
    installed package's folder, without importing it: :func:`kdgraph.models.gguf_support.resolve_local`)."""
    from ...errors import ModelError
    from ...models.gguf_support import PKG_PREFIX, resolve_local

    path = None if path is None else str(path)
    try:
        p = resolve_local(path, "data.tokenizer") if path and path.startswith(PKG_PREFIX) else \
            Path(path or "").expanduser()
    except ModelError as e:  # the same paragraph, as the data error it is here
        raise DataError(str(e)) from None
    if not path or not (p.is_dir() or (p.is_file() and p.suffix == ".gguf")):
        raise DataError(f"data.tokenizer: {path!r} is neither a local tokenizer folder (save_pretrained) nor a .gguf "
                        f"file; kdgraph never downloads, a hub name is not read")
    return p


def files_identity(p: Path) -> dict[str, Any]:
    """A tokenizer file or folder's identity: the number of files and a sha256 of their names and contents (the
    teacher cache's fingerprint, ``--tokenizer`` and a text data set's :meth:`TextRows.tokenizer_identity`)."""
    import hashlib

    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}\n".encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return {"files": len(files), "sha256": h.hexdigest()}


def load_text_tokenizer(path: Optional[str]) -> Any:
    """A local tokenizer: a ``save_pretrained`` folder, or a ``.gguf`` file (its tokenizer, through transformers'
    GGUF path, which needs the ``gguf`` package), also as ``pkg:PACKAGE/FILE.gguf`` (a file an installed package
    ships). ``local_files_only``: a hub name is never downloaded."""
    p = tokenizer_file(path)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError("data.tokenizer: tokenizing text needs transformers: pip install 'kdgraph[hf]'") from None
    kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    try:
        if p.is_dir():
            return AutoTokenizer.from_pretrained(str(p), **kw)
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, **kw)
    except ImportError as e:
        raise DataError(f"data.tokenizer: reading {p.name} needs a package: {e} (pip install gguf)") from None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise DataError(f"data.tokenizer: {path!r} cannot be read as a tokenizer ({e})") from None


def split_documents(docs: Sequence[Document], fraction: float, pick: str = "last",
                    seed: int = 0) -> tuple[list[Document], list[Document]]:
    """``(train, validation)``: per book with two or more documents, ``max(1, round(fraction * n))`` of them held out
    (its last ones, or a seeded random choice), never all; single-document books are pooled as one book."""
    groups: dict[str, list[int]] = {}
    per_book: dict[str, int] = {}
    for d in docs:
        per_book[d.book] = per_book.get(d.book, 0) + 1
    for i, d in enumerate(docs):
        groups.setdefault(d.book if per_book[d.book] > 1 else _SINGLES, []).append(i)
    rng = random.Random(seed)
    held: set[int] = set()
    for members in groups.values():
        if len(members) < 2:
            continue
        k = min(len(members) - 1, max(1, round(fraction * len(members))))
        held.update(members[-k:] if pick == "last" else rng.sample(members, k))
    if not held:
        raise DataError(f"data.text.validation: {len(docs)} document(s) leave none to hold out; validation needs at "
                        f"least two documents in one book (or two single-document books)")
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def encode_documents(docs: Sequence[Document], tokenizer: Any, max_length: int,
                     add_eos: bool = True) -> list[tuple[list[int], list[int]]]:
    """Each document's pieces of at most ``max_length`` tokens: ``(input_ids, labels)``, labels -100 on the prompt
    and on each piece's first token."""
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise DataError("data.text.add_eos: the tokenizer has no EOS token; set add_eos: false or use a tokenizer "
                        "with one")
    if not docs:  # (a tokenizer refuses an empty batch: kdgraph eval builds no training rows)
        return []
    texts = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    prompts = [[] for _ in docs]
    if any(d.prompt for d in docs):
        prompts = tokenizer([d.prompt for d in docs], add_special_tokens=False)["input_ids"]
    pieces = []
    for prompt, text in zip(prompts, texts):
        ids = list(prompt) + list(text) + ([eos] if add_eos else [])
        labels = [IGNORE_INDEX] * len(prompt) + list(text) + ([eos] if add_eos else [])
        for a in range(0, len(ids), max_length):
            lab = labels[a:a + max_length]
            lab[0] = IGNORE_INDEX
            if any(x != IGNORE_INDEX for x in lab):
                pieces.append((ids[a:a + max_length], lab))
    return pieces


def pack_pieces(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Rows of piece indices: consecutive pieces while the row's tokens fit in ``max_length``."""
    rows: list[list[int]] = []
    used = max_length
    for i, n in enumerate(lengths):
        if used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def text_batch_keys(named: Sequence[str], packing: bool) -> list[str]:
    """The batch keys (besides ``labels``) for the spec's ``input.named``, or a DataError saying what to declare."""
    allowed = {"input_ids", "position_ids"} | (set() if packing else {"attention_mask"})
    needed = {"input_ids", "position_ids"} if packing else {"input_ids"}
    bad, missing = [k for k in named if k not in allowed], sorted(needed - set(named))
    if bad or missing:
        want = "input_ids and position_ids (no attention_mask: the per-document mask is built from the position ids)" \
            if packing else "input_ids, and attention_mask and / or position_ids if the networks take them"
        raise DataError(f"input.named: data.dataset text with packing {str(packing).lower()} gives {want}; the spec "
                        + (f"declares {', '.join(bad)}" if bad else f"lacks {', '.join(missing)}"))
    return list(named)


class TextRows(Dataset):
    """Rows of ``max_length`` tokens built from pieces (:func:`encode_documents`); :meth:`get_batch` builds a batch."""

    def __init__(self, pieces: Sequence[tuple[list[int], list[int]]], max_length: int, pad_id: int, packing: bool,
                 keys: Sequence[str] = ("input_ids", "attention_mask"), description: str = "text",
                 tokenizer: Optional[Path] = None):
        self.pieces, self.max_length, self.pad_id, self.packing = list(pieces), max_length, pad_id, packing
        self.keys, self.description, self.tokenizer = list(keys), description, tokenizer
        self.rows = pack_pieces([len(p[0]) for p in self.pieces], max_length) if packing else \
            [[i] for i in range(len(self.pieces))]
        self.scored_tokens = sum(sum(x != IGNORE_INDEX for x in p[1]) for p in self.pieces)

    def __len__(self) -> int:
        return len(self.rows)

    def tokenizer_identity(self) -> Optional[dict[str, Any]]:
        """The tokenizer's :func:`files_identity` (None when built without one): the teacher cache's fingerprint."""
        return None if self.tokenizer is None else files_identity(self.tokenizer)

    def packing_identity(self) -> dict[str, Any]:
        """How rows were built (the teacher cache's fingerprint; the ids themselves are hashed apart)."""
        return {"packing": self.packing, "max_length": self.max_length, "pad_id": self.pad_id, "keys": self.keys}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.get_batch([index]).items()}

    def row(self, index: int) -> dict[str, list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in self.rows[index]:
            a, b = self.pieces[i]
            ids += a
            labels += b
            pos += range(len(a))
        n, pad = len(ids), self.max_length - len(ids)
        return {"input_ids": ids + [self.pad_id] * pad, "labels": labels + [IGNORE_INDEX] * pad,
                "position_ids": pos + list(range(pad)), "attention_mask": [1] * n + [0] * pad}

    def get_batch(self, indices: Sequence[int], seeds: Any = None) -> dict[str, torch.Tensor]:
        rows = [self.row(i) for i in indices]
        return {k: torch.tensor([r[k] for r in rows], dtype=torch.int64) for k in (*self.keys, "labels")}


def text_datasets(spec: Any, need_train: bool = True) -> tuple[Dataset, Dataset, str, int]:
    """``(train, validation, description, tokenizer size)`` of a spec's ``data.dataset: text``."""
    d = spec.data
    t = d.text
    keys = text_batch_keys(list(spec.input.named), t.packing)
    docs = [doc for s in t.sources for doc in read_source(s.kind, s.path, s.max_documents)]
    train_docs, val_docs = split_documents(docs, t.validation.fraction, t.validation.pick, t.validation.seed)
    tok = load_text_tokenizer(d.tokenizer)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    kinds = "+".join(s.kind for s in t.sources)
    out, tok_file = [], tokenizer_file(d.tokenizer)
    for name, part in (("train", train_docs if need_train else []), ("validation", val_docs)):
        rows = TextRows(encode_documents(part, tok, d.max_length, t.add_eos), d.max_length, pad, t.packing, keys,
                        f"{kinds} {name} ({len(part)} documents)", tok_file)
        out.append(rows)
    train, val = out
    desc = (f"text {kinds}: {len(train_docs)} train / {len(val_docs)} held-out documents ({t.validation.pick} "
            f"{t.validation.fraction:g} per book), "
            + (f"{train.scored_tokens:,} / {val.scored_tokens:,} scored tokens, " if need_train else
               f"{val.scored_tokens:,} held-out scored tokens, ") +
            f"rows of {d.max_length} tokens{', packed' if t.packing else ''}")
    return (train if need_train else val), val, desc, len(tok)
