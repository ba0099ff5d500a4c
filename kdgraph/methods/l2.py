"""L2: feature regression with mean squared error (the "L2" baseline of PAD, Zhang et al. 2020).

    L_2 = mean( (f_s - f_t)^2 )          (reduction: mean, the default)
    L_2 = sum( (f_s - f_t)^2 )           (reduction: sum)

ImageNet: the 512-d average-pooled features of both ResNets, weight 15, no connector::

    - {name: l2, type: mse, weight: 15.0,
       inputs: {student: "student:avgpool", teacher: "teacher:avgpool"}}

torchdistill's GLUE STS-B distillation (Matsubara, NLP-OSS 2023) regresses the student's classifier output on the
teacher's with ``torch.nn.MSELoss(reduction='sum')``: ``args: {reduction: sum}``.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from .registry import register_loss
from .args import MethodArgs
from .base import DistillLoss, check_reduction


class MSEArgs(MethodArgs):
    reduction: Literal["mean", "sum"] = Field("mean", description="mean over every element, or their sum "
                                                                 "(as torch.nn.MSELoss's reduction)")


@register_loss("mse")
class MSELoss(DistillLoss):
    """``F.mse_loss(student, teacher, reduction)`` (mean over every element by default)."""

    inputs = ("student", "teacher")
    same_shape = (("student", "teacher"),)
    Args = MSEArgs

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student, teacher, reduction=self.reduction)
