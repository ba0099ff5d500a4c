"""token_tvd: total variation distance between the teacher's and the student's next-token distributions, one of
the divergences of DistiLLM's and Wen et al.'s studies (Y. Wen, Z. Li, W. Du, L. Mou, "f-Divergence Minimization
for Sequence-Level Knowledge Distillation", ACL 2023, token level)::

    L = 1/N * sum_{kept tokens n} 1/2 * sum_v | softmax(z_t[n] / T)_v - softmax(z_s[n] / T)_v |

over the tokens the labels keep, normalised by the step's token count (:mod:`kdgraph.methods.token_base`). Values
lie in [0, 1]. Spec::

    losses:
      - {name: ce, type: token_ce, weight: 0.5}
      - {name: tvd, type: token_tvd, weight: 0.5, inputs: {student: "student:lm_head", teacher: "teacher:lm_head"}}
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .registry import register_loss
from .token_base import TokenLoss


@register_loss("token_tvd")
class TokenTVD(TokenLoss):
    """Total variation ``1/2 * ||p_t - p_s||_1`` per kept token."""

    def per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        p_s = F.softmax(student / self.temperature, dim=-1)
        p_t = F.softmax(teacher / self.temperature, dim=-1)
        return 0.5 * (p_t - p_s).abs().sum(-1)
