"""token_kl: forward KL between the teacher's and the student's next-token distributions (word-level / token-level
KD of a causal LM, as in Y. Kim & A. M. Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016, eq. 3, and
TRL's ``GKDTrainer`` with ``beta = 0``)::

    L = 1/N * sum_{kept tokens n} KL( softmax(z_t[n] / T) || softmax(z_s[n] / T) )

over the tokens the labels keep, normalised by the step's token count (:mod:`kdgraph.methods.token_base`).
The CE mix is a second term in the spec::

    losses:
      - {name: ce, type: token_ce, weight: 0.5}
      - {name: kd, type: token_kl, weight: 0.5, args: {temperature: 1.0, vocab_size: 49152},
         inputs: {student: "student:lm_head", teacher: "teacher:lm_head"}}
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .registry import register_loss
from .token_base import TokenLoss


@register_loss("token_kl")
class TokenKL(TokenLoss):
    """Forward KL ``KL(p_t || p_s)`` per kept token (mode-covering)."""

    def per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_p_s = F.log_softmax(student / self.temperature, dim=-1)
        log_p_t = F.log_softmax(teacher / self.temperature, dim=-1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
