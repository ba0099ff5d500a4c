"""NKD: normalized knowledge distillation (target term + normalized non-target term).

Z. Yang, A. Zeng, C. Yuan, Y. Li, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
Approach with Normalized Loss and Customized Soft Labels", ICCV 2023, https://arxiv.org/abs/2303.13005
(code: yzd-v/cls_KD, ``mmcls/models/dis_losses/nkd.py``)

With ``t`` the label, ``S = softmax(z_s)``, ``T = softmax(z_t)`` and ``S^``, ``T^`` the softmax at temperature
tau over the non-target classes only (the target logit removed)::

    L_NKD = -1/B sum_i T_t log S_t  -  gamma * tau^2 * 1/B sum_i sum_{k != t} T^_k log S^_k

ImageNet (ResNet-34 -> ResNet-18, cls_KD ``configs/distillers/imagenet/res34_distill_res18_img.py``: tau 1,
gamma 1.5, added to the CE term)::

    - {name: ce, type: cross_entropy, weight: 1.0}
    - {name: nkd, type: nkd, weight: 1.0, args: {temperature: 1.0, gamma: 1.5}}

Inputs default to the two networks' logits and the batch's labels.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch.nn import functional as F

from .registry import register_loss
from .args import MethodArgs, NonNegative, Positive
from .base import DistillLoss


class NKDArgs(MethodArgs):
    temperature: Positive = Field(1.0, description="temperature tau of the non-target term, > 0")
    gamma: NonNegative = Field(1.5, description="weight of the non-target term, >= 0")


@register_loss("nkd")
class NKDLoss(DistillLoss):
    """``-T_t log S_t - gamma * tau^2 * sum_{k != t} T^_k log S^_k``, averaged over the batch."""

    inputs = ("student", "teacher", "targets")
    default_inputs = {"student": "student:@output", "teacher": "teacher:@output", "targets": "batch:targets"}
    same_shape = (("student", "teacher"),)
    batch_only_inputs = ("targets",)
    Args = NKDArgs

    def __init__(self, temperature: float = 1.0, gamma: float = 1.5):
        super().__init__()
        if temperature <= 0 or gamma < 0:
            raise ValueError(f"need temperature > 0 and gamma >= 0, got {temperature}, {gamma}")
        self.temperature, self.gamma = float(temperature), float(gamma)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        label = targets.reshape(-1, 1)
        n, c = student.shape
        s_t = torch.gather(F.log_softmax(student, dim=1), 1, label)
        t_t = torch.gather(F.softmax(teacher, dim=1), 1, label).detach()
        loss_t = -(t_t * s_t).mean()
        keep = torch.ones_like(student, dtype=torch.bool).scatter_(1, label, False)
        log_s_hat = F.log_softmax(student[keep].reshape(n, c - 1) / self.temperature, dim=1)
        t_hat = F.softmax(teacher[keep].reshape(n, c - 1) / self.temperature, dim=1)
        loss_non = -self.gamma * self.temperature ** 2 * (t_hat * log_s_hat).sum(dim=1).mean()
        return loss_t + loss_non
