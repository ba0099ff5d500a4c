"""DKD: decoupled knowledge distillation (target and non-target class terms, weighted apart).

B. Zhao, Q. Cui, R. Song, Y. Qiu, J. Liang, "Decoupled Knowledge Distillation", CVPR 2022,
https://arxiv.org/abs/2203.08679 (code: megvii-research/mdistiller, ``mdistiller/distillers/DKD.py``)

With ``b = [p_t, 1 - p_t]`` the binary target / non-target probabilities at temperature T and ``p^`` the
softmax over the non-target classes only (the target logit removed)::

    TCKD = T^2 * KL(b_teacher || b_student)          NCKD = T^2 * KL(p^_teacher || p^_student)
    L_DKD = alpha * TCKD + beta * NCKD                (each KL summed over classes, averaged over the batch)

The paper warms the DKD term up linearly over the first epochs (20 on CIFAR-100); in kdgraph that is the loss
weight's schedule (a general mechanism, see docs/schedules.md), not part of this loss. ImageNet (ResNet-34 ->
ResNet-18, mdistiller ``configs/imagenet/r34_r18/dkd.yaml``: alpha 1, beta 0.5, T 1, warm-up 1 epoch)::

    - {name: ce, type: cross_entropy, weight: 1.0}
    - {name: dkd, type: dkd, args: {alpha: 1.0, beta: 0.5, temperature: 1.0},
       weight: {schedule: linear_warmup, epochs: 1, to: 1.0}}

Inputs default to the two networks' logits and the batch's labels.
"""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field
from torch.nn import functional as F

from .registry import register_loss
from .args import MethodArgs, NonNegative, Positive
from .base import DistillLoss


class DKDArgs(MethodArgs):
    alpha: NonNegative = Field(1.0, description="weight of the target-class term TCKD, >= 0")
    beta: NonNegative = Field(8.0, description="weight of the non-target-class term NCKD, >= 0")
    temperature: Positive = Field(4.0, description="softening temperature T, > 0")


def target_mask(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Boolean B x C mask, True at each row's label."""
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, targets.reshape(-1, 1), True)


def dkd_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, alpha: float, beta: float,
             temperature: float | torch.Tensor) -> torch.Tensor:
    """``alpha * TCKD + beta * NCKD`` (both ``T^2``-scaled, summed over classes, averaged over the batch)."""
    gt = target_mask(student, targets)
    p_s = F.softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], dim=1)
    n = student.shape[0]
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * temperature ** 2 / n
    # the target logit pushed to -inf in effect (the authors subtract 1000 / T-scaled logits; same softmax)
    log_q_s = F.log_softmax(student / temperature - 1000.0 * gt, dim=1)
    q_t = F.softmax(teacher / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * temperature ** 2 / n
    return alpha * tckd + beta * nckd


@register_loss("dkd")
class DKDLoss(DistillLoss):
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` at temperature T."""

    inputs = ("student", "teacher", "targets", "temperature")
    default_inputs = {"student": "student:@output", "teacher": "teacher:@output", "targets": "batch:targets"}
    same_shape = (("student", "teacher"),)
    batch_only_inputs = ("targets",)
    Args = DKDArgs

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0):
        super().__init__()
        if temperature <= 0 or alpha < 0 or beta < 0:
            raise ValueError(f"need temperature > 0, alpha >= 0, beta >= 0; got {temperature}, {alpha}, {beta}")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                temperature: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``temperature``: an optional tensor tap (CTKD's learnable ``adapter:ctkd``) overriding the argument."""
        t = self.temperature if temperature is None else temperature
        return dkd_loss(student, teacher, targets, self.alpha, self.beta, t)
