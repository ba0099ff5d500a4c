"""token_ce: the task term of a causal LM, next-token cross-entropy of the student against the (shifted) labels,
with the same mask and normaliser as the distillation terms (:mod:`kdgraph.methods.token_base`), so a mix
``w * token_ce + (1 - w) * token_kl`` weighs both over the same tokens, whatever the micro-batch split::

    L = -1/N * sum_{kept tokens n} log softmax(z_s[n] / T)[y_{n+1}]

It reads only the student's logits and the labels (no teacher). Spec::

    losses:
      - {name: ce, type: token_ce, weight: 0.5}          # student:@output (the logits) and batch:targets
      - {name: kd, type: token_kl, weight: 0.5, inputs: {student: "student:lm_head", teacher: "teacher:lm_head"}}

For the chunked vocabulary pass: :meth:`TokenCE.per_token` takes the kept rows' logits and their target ids
(``N x V`` and ``N``), not teacher logits.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from .registry import register_loss
from .token_base import TokenLoss


@register_loss("token_ce")
class TokenCE(TokenLoss):
    """Next-token cross-entropy over the kept tokens, normalised like the token distillation losses."""

    inputs = ("student", "labels", "num_tokens")
    default_inputs = {"student": "student:@output", "labels": "batch:targets", "num_tokens": "batch:num_tokens"}
    task_term = True
    same_vocabulary = False  # reads the student alone

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels aligned with :meth:`token_mask` (shifted when ``shift``)."""
        return labels[:, 1:] if self.shift else labels

    def per_token(self, student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``N x V`` logits of the kept tokens and their ``N`` target ids -> ``N`` cross-entropies."""
        z = student if self.temperature == 1.0 else student / self.temperature  # (no N x V copy at T = 1)
        return F.cross_entropy(z, targets, reduction="none")

    def forward(self, student: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                num_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = self.token_mask(labels)
        s = self.align(student)[mask].float()
        total = self.per_token(s, self.targets(labels)[mask]).sum()
        return self.normalise(total, mask.sum(), num_tokens)
