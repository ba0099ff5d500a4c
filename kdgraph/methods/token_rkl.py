"""token_rkl: reverse KL between the student's and the teacher's next-token distributions (mode-seeking), as in
MiniLLM (Y. Gu, L. Dong, F. Wei, M. Huang, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024,
token level) and TRL's ``GKDTrainer`` with ``beta = 1``::

    L = 1/N * sum_{kept tokens n} KL( softmax(z_s[n] / T) || softmax(z_t[n] / T) )

over the tokens the labels keep, normalised by the step's token count (:mod:`kdgraph.methods.token_base`); no T^2
factor (as TRL). Spec::

    losses:
      - {name: ce, type: token_ce, weight: 0.5}
      - {name: rkl, type: token_rkl, weight: 0.5, args: {temperature: 1.0},
         inputs: {student: "student:lm_head", teacher: "teacher:lm_head"}}
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .registry import register_loss
from .token_base import TokenLoss


@register_loss("token_rkl")
class TokenRKL(TokenLoss):
    """Reverse KL ``KL(p_s || p_t)`` per kept token (mode-seeking)."""

    def per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_p_s = F.log_softmax(student / self.temperature, dim=-1)
        log_p_t = F.log_softmax(teacher / self.temperature, dim=-1)
        return (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
