"""Token-level losses of causal language models: the shared causal shift, mask, vocabulary slice and normaliser.

A causal LM's logits at position ``i`` predict the token at ``i + 1``. Every token loss therefore

1. **shifts**: logits ``[:, :-1]`` are scored against labels ``[:, 1:]`` (``shift: true``, the default; a data
   pipeline that already shifted its labels sets ``shift: false``);
2. **masks**: a position counts only where its (shifted) label is not ``-100``. The data pipeline writes ``-100``
   where a token must not be scored: padding, the prompt of a prompt/completion pair, everything after EOS, and the
   first token of each packed document;
3. **slices the vocabulary**: both logits are cut to ``vocab_size`` (the tokenizer's size) when given, so a network
   whose embedding was padded to a multiple of 64 (Qwen2.5: 151,936 vs 152,064 rows) is compared on real tokens
   only. Without ``vocab_size`` the two last dimensions must be equal (checked at compile time);
4. **computes** :meth:`TokenLoss.per_token` on the kept rows only (``N x V`` in fp32: one value per token);
5. **normalises** the sum by the number of kept tokens. When the batch carries ``num_tokens`` (a ``batch:`` tap:
   the kept-token count of the whole optimizer step, over micro-batches and ranks, divided by the number of
   micro-batches x ranks the runtime averages over), the sum is divided by that instead, so the loss and its
   gradients are the same whatever the micro-batch split, the gradient accumulation or the number of ranks.
   ``num_tokens`` is bound to ``batch:num_tokens`` by default and is an optional batch input: kdgraph's trainer
   fills it every optimizer step (:mod:`kdgraph.train.token_count`); a custom loop may pass it
   (``Distiller.count_tokens``, docs/lm_losses.md) or leave it out.

Subclasses implement :meth:`per_token` only; the compiler's chunked vocabulary pass calls :meth:`token_mask`,
:meth:`per_token` and :meth:`normalise` on chunks of tokens, so a subclass must not override :meth:`forward`.
"""
from __future__ import annotations

from typing import ClassVar, Mapping, Optional

import torch
from pydantic import Field

from ..errors import KDGraphError, ShapeError
from .args import Flag, MethodArgs, PosInt, Positive
from .base import DistillLoss, Shape, _fmt
from .token_sparse import SparseTeacher

__all__ = ["TokenLoss", "TokenLossArgs", "IGNORE_INDEX"]

#: the label of a position that is not scored (transformers' and PyTorch's convention)
IGNORE_INDEX = -100


class TokenLossArgs(MethodArgs):
    """Arguments every token loss takes."""

    temperature: Positive = Field(1.0, description="softening temperature T (> 0): both logits are divided by T "
                                                   "before the softmax; no T^2 factor (as TRL's GKD)")
    vocab_size: Optional[PosInt] = Field(None, description="the tokenizer's vocabulary size: logits are sliced to "
                                                           "their first vocab_size entries (padded embeddings); "
                                                           "unset: both networks' vocabularies must be equal")
    shift: Flag = Field(True, description="causal shift: logits[:, :-1] are scored against labels[:, 1:]; false "
                                          "when the data's labels are already aligned with the logits")


def sparse_capable() -> list[str]:
    """Registered token losses that implement :meth:`TokenLoss.per_token_sparse`."""
    from .registry import LOSSES

    names = []
    for name in LOSSES.names():
        cls = LOSSES.get(name)
        if isinstance(cls, type) and issubclass(cls, TokenLoss) and \
                cls.per_token_sparse is not TokenLoss.per_token_sparse:
            names.append(name)
    return sorted(names)


class TokenLoss(DistillLoss):
    """Base of the token-level losses (``token_kl``, ``token_rkl``, ...): shift, mask, slice, per-token, normalise."""

    inputs = ("student", "teacher", "labels", "num_tokens")
    default_inputs = {"student": "student:@output", "teacher": "teacher:@output", "labels": "batch:targets",
                      "num_tokens": "batch:num_tokens"}
    batch_only_inputs = ("labels", "num_tokens")
    optional_batch_inputs = ("num_tokens",)  # without it: the micro-batch's own count
    same_vocabulary = True  # both networks must share a tokenizer (kdgraph.compiler.vocabulary checks it)
    Args: ClassVar = TokenLossArgs

    def __init__(self, temperature: float = 1.0, vocab_size: Optional[int] = None, shift: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        self.shift = bool(shift)

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str,
                     args: Optional[Mapping] = None) -> None:
        """Logits are ``B x T x V``; without ``vocab_size`` both V must be equal; with it both must be >= it."""
        s, t = shapes.get("student"), shapes.get("teacher")
        vocab = (args or {}).get("vocab_size")
        for name, shape in (("student", s), ("teacher", t)):
            if shape is not None and len(shape) != 3:
                raise ShapeError(f"{where}: input {name!r} ({taps[name]}) has shape {_fmt(shape)}; a token loss reads "
                                 f"B x T x V logits (a causal LM's lm_head output)")
            if shape is not None and vocab is not None and shape[-1] < vocab:
                raise ShapeError(f"{where}: args.vocab_size is {vocab} but {name} logits ({taps[name]}) have only "
                                 f"{shape[-1]} entries; vocab_size is the tokenizer's size, at most each network's")
        if s is not None and t is not None and vocab is None and s[-1] != t[-1]:
            raise ShapeError(f"{where}: student logits ({taps['student']}) have {s[-1]} vocabulary entries and "
                             f"teacher logits ({taps['teacher']}) {t[-1]}. Set args.vocab_size to the tokenizer's "
                             f"size to compare the real tokens only (padded embeddings); networks with different "
                             f"tokenizers cannot be distilled token by token.")

    # ---- the pieces the chunked vocabulary pass reuses -------------------------------------------------------
    def token_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """Boolean ``B x T'`` mask of the scored positions (``T' = T - 1`` when shifting)."""
        lab = labels[:, 1:] if self.shift else labels
        return lab != IGNORE_INDEX

    def align(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits aligned with :meth:`token_mask` and sliced to ``vocab_size``."""
        if self.shift:
            logits = logits[:, :-1]
        return logits if self.vocab_size is None else logits[..., :self.vocab_size]

    def count_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        """The number of tokens this loss scores in a batch with ``labels`` (what ``num_tokens`` counts)."""
        return self.token_mask(labels).sum()

    def per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The loss of each kept token: ``N x V`` student and teacher logits (fp32, unscaled) -> ``N`` values."""
        raise NotImplementedError

    def per_token_sparse(self, student: torch.Tensor, teacher: SparseTeacher) -> torch.Tensor:
        """The loss of each kept token against a sparse (top-K cached) teacher: ``N x V`` student logits (fp32,
        unscaled) and a :class:`~kdgraph.methods.token_sparse.SparseTeacher` of ``N`` rows -> ``N`` values.
        A loss that cannot be computed from a top-K support keeps this refusal."""
        raise KDGraphError(f"loss {type(self).__name__} cannot read a top-K teacher cache (a sparse teacher "
                           f"distribution); the token losses that can: {', '.join(sparse_capable())}. Read the "
                           f"teacher's logits online (drop runtime.teacher_cache) or use one of those.")

    def normalise(self, total: torch.Tensor, kept: torch.Tensor,
                  num_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``total / num_tokens`` when the step's count is given (a share of it: may be below 1), else
        ``total / max(kept, 1)``; a zero count (nothing kept: ``total`` is 0) divides by 1."""
        if num_tokens is None:
            return total / kept.to(total.dtype).clamp_min(1)
        denom = torch.as_tensor(num_tokens, device=total.device).to(total.dtype)
        return total / torch.where(denom > 0, denom, torch.ones_like(denom))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                num_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = self.token_mask(labels)
        s = self.align(student)[mask].float()
        if isinstance(teacher, SparseTeacher):  # the teacher's lm_head from a top-K cache: kept tokens only
            teacher.check_for(self, mask, s.shape[-1])
            return self.normalise(self.per_token_sparse(s, teacher).sum(), mask.sum(), num_tokens)
        t = self.align(teacher)[mask].float()
        total = self.per_token(s, t).sum()
        return self.normalise(total, mask.sum(), num_tokens)
