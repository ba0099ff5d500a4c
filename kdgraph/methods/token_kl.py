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

From a top-K teacher cache (``runtime.teacher_cache`` with ``runtime.teacher_cache_tap: "teacher:lm_head"``) the
teacher is a :class:`~kdgraph.methods.token_sparse.SparseTeacher` and the loss is the sparse forward KL on the
kept support, the tail as ``args.sparse_tail`` says (``bucket``: one extra "rest" outcome; ``zero``: ignored;
:mod:`kdgraph.methods.token_sparse`).
"""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

import torch
from pydantic import Field
from torch.nn import functional as F

from .registry import register_loss
from .token_base import TokenLoss, TokenLossArgs
from .token_sparse import SparseTeacher, sparse_forward_kl


class TokenKLArgs(TokenLossArgs):
    """token_kl's arguments: the shared token-loss ones and the tail treatment of a top-K cached teacher."""

    sparse_tail: Literal["bucket", "zero"] = Field(
        "bucket", description="with a top-K teacher cache: 'bucket' (the tail mass as one extra outcome, the KL of "
                              "the K+1-outcome distributions) or 'zero' (the top-K terms only, DistillKit's default)")


@register_loss("token_kl")
class TokenKL(TokenLoss):
    """Forward KL ``KL(p_t || p_s)`` per kept token (mode-covering)."""

    Args: ClassVar = TokenKLArgs

    def __init__(self, temperature: float = 1.0, vocab_size: Optional[int] = None, shift: bool = True,
                 sparse_tail: str = "bucket"):
        super().__init__(temperature, vocab_size, shift)
        self.sparse_tail = sparse_tail

    def per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_p_s = F.log_softmax(student / self.temperature, dim=-1)
        log_p_t = F.log_softmax(teacher / self.temperature, dim=-1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)

    def per_token_sparse(self, student: torch.Tensor, teacher: SparseTeacher) -> torch.Tensor:
        return sparse_forward_kl(student, teacher, self.temperature, self.sparse_tail)
