"""Token-by-token losses need one tokenizer: the vocabulary checks, run before the networks are captured.

A loss class with ``same_vocabulary = True`` (the token losses) compares the teacher's and the student's
distributions over the same token ids, which is meaningful only when both networks read the same tokenizer.
Cross-tokenizer distillation is out of scope, so a mismatch is refused with one paragraph:

* **tokenizer folders**: each network's tokenizer is its ``tokenizer:`` folder in the spec, or else
  ``data.tokenizer``. When both networks have one, their ``tokenizer.json`` vocabularies (token -> id, added
  tokens included; read as JSON, no tokenizer code runs) must agree on every id below the loss's ``vocab_size``
  (all ids when it is unset);
* **configs**: a transformers network's ``config`` gives its embedding size (``vocab_size``) and its special
  token ids. ``args.vocab_size`` may not exceed either network's ``config.vocab_size``; without it the two sizes
  must be equal (a padded embedding needs ``vocab_size``: Qwen2.5's 151,936 vs 152,064 rows); ``bos``, ``eos`` and
  ``pad`` ids set in both configs must be equal.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..errors import SpecError
from ..methods.registry import LOSSES

__all__ = ["check_vocabularies", "tokenizer_vocabulary"]

_SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id")


def tokenizer_vocabulary(folder: str, where: str) -> dict[int, str]:
    """id -> token of the ``tokenizer.json`` in ``folder`` (its model's vocabulary and its added tokens)."""
    path = Path(folder).expanduser() / "tokenizer.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        vocab = raw["model"]["vocab"]
        ids = ({int(i): str(t) for t, i in vocab.items()} if isinstance(vocab, dict)
               else {i: str(entry[0]) for i, entry in enumerate(vocab)})  # Unigram: [[piece, score], ...]
        ids.update({int(a["id"]): str(a["content"]) for a in raw.get("added_tokens") or []})
        return ids
    except OSError as e:
        raise SpecError(f"{where}: cannot read {path} ({e.strerror or e}); a tokenizer folder holds the "
                        f"tokenizer.json that tokenizer.save_pretrained(DIR) writes") from None
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise SpecError(f"{where}: {path} is not a tokenizer.json with a model vocabulary ({type(e).__name__}: "
                        f"{e})") from None


def _first_difference(a: dict[int, str], b: dict[int, str], limit: Optional[int]) -> Optional[str]:
    ids = sorted(set(a) | set(b))
    for i in ids if limit is None else [i for i in ids if i < limit]:
        if a.get(i) != b.get(i):
            return f"id {i} is {a.get(i)!r} for the teacher and {b.get(i)!r} for the student"
    return None


def _config(module: nn.Module) -> Any:
    return getattr(module, "config", None)


def check_vocabularies(spec: Any, teacher: nn.Module, student: nn.Module) -> None:
    """Refuse (SpecError) a token loss between networks whose tokenizers differ (see the module)."""
    readers = []
    for si, stage in enumerate(spec.stages):
        for li, ls in enumerate(stage.losses):
            cls = LOSSES.get(ls.type) if ls.type in LOSSES else None  # an unknown type: Prepared says so
            if getattr(cls, "same_vocabulary", False):
                vocab = ls.args.get("vocab_size") if isinstance(ls.args.get("vocab_size"), int) else None
                readers.append((spec.where("stages", si, "losses", li), f"{ls.type} ({ls.name})", vocab))
    if not readers:
        return
    data_tok = getattr(spec.data, "tokenizer", None)
    folders = {role: getattr(getattr(spec, role), "tokenizer", None) or data_tok for role in ("teacher", "student")}
    origin = {role: f"{role}.tokenizer" if getattr(getattr(spec, role), "tokenizer", None) else "data.tokenizer"
              for role in folders}
    vocabs = None
    if folders["teacher"] and folders["student"] and folders["teacher"] != folders["student"]:
        vocabs = {r: tokenizer_vocabulary(f, origin[r]) for r, f in folders.items()}
    cfg = {"teacher": _config(teacher), "student": _config(student)}
    sizes = {r: getattr(c, "vocab_size", None) for r, c in cfg.items()}
    for where, what, vocab in readers:
        lead = (f"{where}: {what} compares the teacher's and the student's next-token distributions token by "
                f"token, so both networks must use one tokenizer (cross-tokenizer distillation is not supported)")
        if vocabs is not None:
            diff = _first_difference(vocabs["teacher"], vocabs["student"], vocab)
            if diff is not None:
                raise SpecError(f"{lead}, but the teacher's tokenizer ({origin['teacher']}: {folders['teacher']}, "
                                f"{len(vocabs['teacher'])} tokens) and the student's ({origin['student']}: "
                                f"{folders['student']}, {len(vocabs['student'])} tokens) differ: {diff}. Pick a "
                                f"student of the teacher's tokenizer family, or give each network its own "
                                f"tokenizer folder if these are not the ones they were trained with.")
        for role, size in sizes.items():
            if vocab is not None and size is not None and vocab > size:
                raise SpecError(f"{where}.args.vocab_size: is {vocab}, above the {role}'s config.vocab_size "
                                f"({size}); vocab_size is the tokenizer's size, at most each network's embedding "
                                f"rows (teacher {sizes['teacher']}, student {sizes['student']})")
        if vocab is None and None not in sizes.values() and sizes["teacher"] != sizes["student"]:
            raise SpecError(f"{lead}, but the teacher's config.vocab_size is {sizes['teacher']} and the student's "
                            f"{sizes['student']}. If one embedding is only padded (extra rows beyond the tokenizer's "
                            f"size), set args.vocab_size to the tokenizer's size; otherwise the tokenizers differ.")
        for key in _SPECIAL:
            ids = {r: getattr(c, key, None) for r, c in cfg.items()}
            if None not in ids.values() and ids["teacher"] != ids["student"]:
                raise SpecError(f"{lead}, but their configs disagree on {key}: teacher {ids['teacher']}, student "
                                f"{ids['student']}: the networks were trained with different tokenizers. Pick a "
                                f"student of the teacher's tokenizer family (or fix the config that is wrong).")
