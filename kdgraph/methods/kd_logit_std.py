"""KD w/ LS: knowledge distillation on standardised logits (logit standardisation).

S. Sun, W. Ren, J. Li, R. Wang, X. Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024,
https://arxiv.org/abs/2403.01427

A shared temperature forces the student to match the teacher's logit *range*, not only their ranking. Each
sample's logits are z-scored first (``std`` is the unbiased standard deviation over the classes, as in the
authors' code and torchdistill 1.1.5's ``LogitStdKDLoss``)::

    Z(z)        = (z - mean(z)) / (eps + std(z))
    L_KD-LS     = T^2 * KL( softmax(Z(z_t) / T) || softmax(Z(z_s) / T) )      (KL averaged over the batch)

torchdistill's ``alpha * CE + beta * T^2 * KL`` is two terms here. ImageNet (ResNet-34 -> ResNet-18, torchdistill's
``configs/sample/ilsvrc2012/kd_w_ls``: T = 2, alpha = 0.5, beta = 9)::

    - {name: ce, type: cross_entropy, weight: 0.5}
    - {name: kd_ls, type: kd_logit_std, weight: 9.0, args: {temperature: 2.0},
       inputs: {student: "student:@output", teacher: "teacher:@output"}}
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch.nn import functional as F

from .registry import register_loss
from .args import MethodArgs, Positive
from .base import DistillLoss


class KDLogitStdArgs(MethodArgs):
    temperature: Positive = Field(2.0, description="temperature T applied to the standardised logits, > 0")
    eps: Positive = Field(1e-7, description="added to the standard deviation, > 0")


def standardize(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """Z-score each row: ``(z - mean) / (eps + std)`` over the last dimension (unbiased std)."""
    return (logits - logits.mean(dim=-1, keepdim=True)) / (eps + logits.std(dim=-1, keepdim=True))


@register_loss("kd_logit_std")
class KDLogitStdLoss(DistillLoss):
    """``T^2 * KL(softmax(Z(z_t)/T) || softmax(Z(z_s)/T))`` with ``Z`` the per-sample z-score of the logits."""

    inputs = ("student", "teacher")
    default_inputs = {"student": "student:@output", "teacher": "teacher:@output"}
    same_shape = (("student", "teacher"),)
    Args = KDLogitStdArgs

    def __init__(self, temperature: float = 2.0, eps: float = 1e-7):
        super().__init__()
        if temperature <= 0 or eps <= 0:
            raise ValueError(f"temperature and eps must be > 0, got {temperature}, {eps}")
        self.temperature, self.eps = float(temperature), float(eps)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        log_p_s = F.log_softmax(standardize(student, self.eps) / t, dim=1)
        log_p_t = F.log_softmax(standardize(teacher, self.eps) / t, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)
