"""TTM: transformed teacher matching (KD with the teacher's probabilities power-transformed, no student T).

K. Zheng, E.-H. Yang, "Knowledge Distillation Based on Transformed Teacher Matching", ICLR 2024,
https://arxiv.org/abs/2402.11148 (code: zkxufo/TTM, ``distiller_zoo/ttm.py``)

With ``p_t = softmax(z_t)`` and the power transform ``p_t^gamma / sum_k p_t,k^gamma`` (equal to softmax at
temperature ``1 / gamma``), the student's own probabilities are *not* softened::

    L_TTM = 1/B sum_i KL( p_t,i^gamma / U_gamma(p_t,i)  ||  softmax(z_s,i) ),   U_gamma(p) = sum_k p_k^gamma

Spec (``gamma`` is the authors' ``--ttm_l``; the loss weight is their ``-b``)::

    - {name: ce, type: cross_entropy, weight: 1.0}
    - {name: ttm, type: ttm, weight: 45.0, args: {gamma: 0.1}}
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch.nn import functional as F

from .registry import register_loss
from .args import MethodArgs, Positive
from .base import DistillLoss


class TTMArgs(MethodArgs):
    gamma: Positive = Field(0.1, description="exponent of the teacher's power transform (the authors' ttm_l), > 0")


def transformed_kl(student: torch.Tensor, teacher: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``KL(p_t^gamma / U || softmax(z_s))`` and the normaliser ``U_gamma(p_t)`` (both of length B)."""
    log_p_s = F.log_softmax(student, dim=1)
    p_t = torch.softmax(teacher, dim=1).pow(gamma)
    norm = p_t.sum(dim=1)
    p_t = p_t / norm.unsqueeze(1)
    return F.kl_div(log_p_s, p_t, reduction="none").sum(dim=1), norm


@register_loss("ttm")
class TTMLoss(DistillLoss):
    """``mean_i KL(p_t^gamma normalised || softmax(z_s))``."""

    inputs = ("student", "teacher")
    default_inputs = {"student": "student:@output", "teacher": "teacher:@output"}
    same_shape = (("student", "teacher"),)
    Args = TTMArgs

    def __init__(self, gamma: float = 0.1):
        super().__init__()
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        kl, _ = transformed_kl(student, teacher, self.gamma)
        return kl.mean()
