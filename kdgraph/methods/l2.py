"""L2: feature regression with mean squared error (the "L2" baseline of PAD, Zhang et al. 2020).

    L_2 = mean( (f_s - f_t)^2 )

ImageNet: the 512-d average-pooled features of both ResNets, weight 15, no connector::

    - {name: l2, type: mse, weight: 15.0,
       inputs: {student: "student:avgpool", teacher: "teacher:avgpool"}}
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..registry import register_loss
from .args import NoArgs
from .base import DistillLoss


@register_loss("mse")
class MSELoss(DistillLoss):
    """``F.mse_loss(student, teacher)`` (mean over every element)."""

    inputs = ("student", "teacher")
    same_shape = (("student", "teacher"),)
    Args = NoArgs

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student, teacher)
