"""token_jsd: the generalised Jensen-Shannon divergence of GKD (R. Agarwal, N. Vieillard, Y. Zhou, P. Stanczyk,
S. Ramos, M. Geist, O. Bachem, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
ICLR 2024, eq. 1), per token, as TRL's ``GKDTrainer.generalized_jsd_loss`` computes it::

    m    = beta * p_t + (1 - beta) * p_s                 (p = softmax(z / T))
    JSD  = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)      for 0 < beta < 1
    beta = 0: KL(p_t || p_s)  (forward KL)        beta = 1: KL(p_s || p_t)  (reverse KL)
    L    = 1/N * sum_{kept tokens n} JSD_n

over the tokens the labels keep, normalised by the step's token count (:mod:`kdgraph.methods.token_base`); no T^2
factor. At the end points the paper's mixture formula is identically 0; the paper (and TRL) use forward KL and
reverse KL there, its limits up to a 1/beta or 1/(1 - beta) scale, so kdgraph does as TRL does. Spec::

    losses:
      - {name: ce, type: token_ce, weight: 0.5}
      - {name: jsd, type: token_jsd, weight: 0.5, args: {beta: 0.5, temperature: 1.0},
         inputs: {student: "student:lm_head", teacher: "teacher:lm_head"}}
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch
from pydantic import Field
from torch.nn import functional as F

from .args import Fraction
from .registry import register_loss
from .token_base import TokenLoss, TokenLossArgs


class TokenJSDArgs(TokenLossArgs):
    beta: Fraction = Field(0.5, description="weight of the teacher in the mixture m = beta * p_t + (1 - beta) * "
                                            "p_s, in [0, 1]; 0: forward KL, 1: reverse KL (as TRL's GKD)")


@register_loss("token_jsd")
class TokenJSD(TokenLoss):
    """Generalised JSD with weight ``beta`` per kept token (TRL's ``generalized_jsd_loss``)."""

    Args: ClassVar = TokenJSDArgs

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, vocab_size: Optional[int] = None,
                 shift: bool = True):
        super().__init__(temperature=temperature, vocab_size=vocab_size, shift=shift)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = float(beta)

    def per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_p_s = F.log_softmax(student / self.temperature, dim=-1)
        log_p_t = F.log_softmax(teacher / self.temperature, dim=-1)
        if self.beta == 0.0:
            return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
        if self.beta == 1.0:
            return (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
        log_m = torch.logaddexp(log_p_t + math.log(self.beta), log_p_s + math.log1p(-self.beta))
        kl_t = (log_p_t.exp() * (log_p_t - log_m)).sum(-1)
        kl_s = (log_p_s.exp() * (log_p_s - log_m)).sum(-1)
        return self.beta * kl_t + (1.0 - self.beta) * kl_s
