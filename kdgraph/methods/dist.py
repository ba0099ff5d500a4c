"""DIST: distillation by inter- and intra-class Pearson correlation of the predictions.

T. Huang, S. You, F. Wang, C. Qian, C. Xu, "Knowledge Distillation from A Stronger Teacher",
NeurIPS 2022, https://arxiv.org/abs/2205.10536

Exact matching of the teacher's probabilities (KL) is hard when the teacher is much stronger; DIST
only asks the student to preserve their *relations*, measured by the Pearson correlation
``rho(a, b) = cos(a - mean(a), b - mean(b))``. With ``P_s = softmax(z_s / tau)`` and
``P_t = softmax(z_t / tau)`` (B x C)::

    L_inter = tau^2 * (1 - 1/B * sum_i rho(P_s[i, :], P_t[i, :]))      each sample's class ranking
    L_intra = tau^2 * (1 - 1/C * sum_c rho(P_s[:, c], P_t[:, c]))      each class across the batch
    L_DIST  = beta * L_inter + gamma * L_intra

``eps`` (1e-8) is the cosine similarity's guard against a zero-variance row. ImageNet (ResNet-34 -> ResNet-18, as in
torchdistill's sample configuration): ``CE + 2 * DIST`` with beta = gamma = tau = 1::

    - {name: ce, type: cross_entropy, weight: 1.0}
    - {name: dist, type: dist, weight: 2.0, args: {beta: 1.0, gamma: 1.0, tau: 1.0},
       inputs: {student: "student:@output", teacher: "teacher:@output"}}
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from pydantic import Field

from .registry import register_loss
from .args import MethodArgs, NonNegative, Positive
from .base import DistillLoss


class DISTArgs(MethodArgs):
    beta: NonNegative = Field(1.0, description="weight of the inter-class term, >= 0")
    gamma: NonNegative = Field(1.0, description="weight of the intra-class term, >= 0")
    tau: Positive = Field(1.0, description="softmax temperature, > 0")
    eps: Positive = Field(1e-8, description="cosine similarity guard, > 0")


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (B x C -> B)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return F.cosine_similarity(a, b, dim=1, eps=eps)


@register_loss("dist")
class DISTLoss(DistillLoss):
    """``tau^2 * [beta * (1 - mean inter-class rho) + gamma * (1 - mean intra-class rho)]`` on softmax(z / tau)."""

    inputs = ("student", "teacher")
    default_inputs = {"student": "student:@output", "teacher": "teacher:@output"}
    same_shape = (("student", "teacher"),)
    Args = DISTArgs

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0, eps: float = 1e-8):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if beta < 0 or gamma < 0:
            raise ValueError(f"beta and gamma must be >= 0, got beta={beta}, gamma={gamma}")
        self.beta, self.gamma, self.tau, self.eps = float(beta), float(gamma), float(tau), float(eps)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        p_s = F.softmax(student / self.tau, dim=1)
        p_t = F.softmax(teacher / self.tau, dim=1)
        inter = 1.0 - pearson_rows(p_s, p_t, self.eps).mean()
        intra = 1.0 - pearson_rows(p_s.t(), p_t.t(), self.eps).mean()
        return (self.tau ** 2) * (self.beta * inter + self.gamma * intra)
