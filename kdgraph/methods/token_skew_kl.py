"""token_skew_kl: DistiLLM's skew KL divergences (J. Ko, S. Kim, T. Chen, S.-Y. Yun, "DistiLLM: Towards Streamlined
Distillation for Large Language Models", ICML 2024), per token::

    skew KL          (reverse: false):  KL( p_t || alpha * p_t + (1 - alpha) * p_s )
    skew reverse KL  (reverse: true):   KL( p_s || (1 - alpha) * p_t + alpha * p_s )
    L = 1/N * sum_{kept tokens n} ...                       (p = softmax(z / T); the paper uses T = 1)

over the tokens the labels keep, normalised by the step's token count (:mod:`kdgraph.methods.token_base`).
alpha = 0 gives the plain forward / reverse KL; DistiLLM uses alpha = 0.1.

The authors' code (github.com/jongwooko/distillm, ``distillm/losses.py``, ``skewed_forward_kl``) returns, for the
skew forward KL, the cross-entropy ``-sum_v p_t log m`` without the teacher's entropy term, so its value differs
from the paper's KL by ``H(p_t)``; its gradients are the same (the teacher is constant), so the published models
are the same whichever is computed. kdgraph computes the paper's KL by default; ``authors_value: true`` gives the
code's value (reported numbers then match the authors' logs). Their ``skewed_reverse_kl`` is the paper's formula.
Spec::

    losses:
      - {name: ce, type: token_ce, weight: 0.5}
      - {name: skl, type: token_skew_kl, weight: 0.5, args: {alpha: 0.1, reverse: false},
         inputs: {student: "student:lm_head", teacher: "teacher:lm_head"}}
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch
from pydantic import Field
from torch.nn import functional as F

from .args import Flag, Fraction
from .registry import register_loss
from .token_base import TokenLoss, TokenLossArgs


class TokenSkewKLArgs(TokenLossArgs):
    alpha: Fraction = Field(0.1, description="skew: the weight, in [0, 1), of the first distribution in the "
                                             "mixture (p_t for skew KL, p_s for skew reverse KL); 0: plain KL")
    reverse: Flag = Field(False, description="false: skew KL(p_t || a p_t + (1-a) p_s); true: skew reverse "
                                             "KL(p_s || (1-a) p_t + a p_s)")
    authors_value: Flag = Field(False, description="skew forward KL only: return the authors' code's value, the "
                                                   "cross-entropy -sum p_t log m (no teacher entropy; same "
                                                   "gradients) instead of the paper's KL")


@register_loss("token_skew_kl")
class TokenSkewKL(TokenLoss):
    """DistiLLM's skew KL (``reverse: false``) or skew reverse KL (``reverse: true``) per kept token."""

    Args: ClassVar = TokenSkewKLArgs

    def __init__(self, alpha: float = 0.1, reverse: bool = False, authors_value: bool = False,
                 temperature: float = 1.0, vocab_size: Optional[int] = None, shift: bool = True):
        super().__init__(temperature=temperature, vocab_size=vocab_size, shift=shift)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        if authors_value and reverse:
            raise ValueError("authors_value concerns the skew forward KL only (the authors' skew reverse KL is the "
                             "paper's formula); remove it or set reverse: false")
        self.alpha, self.reverse, self.authors_value = float(alpha), bool(reverse), bool(authors_value)

    def per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_p_s = F.log_softmax(student / self.temperature, dim=-1)
        log_p_t = F.log_softmax(teacher / self.temperature, dim=-1)
        first, second = (log_p_s, log_p_t) if self.reverse else (log_p_t, log_p_s)
        if self.alpha == 0.0:
            log_m = second
        else:  # log(alpha * p_first + (1 - alpha) * p_second), stably
            log_m = torch.logaddexp(first + math.log(self.alpha), second + math.log1p(-self.alpha))
        p = first.exp()
        if self.authors_value:
            return -(p * log_m).sum(-1)
        return (p * (first - log_m)).sum(-1)
