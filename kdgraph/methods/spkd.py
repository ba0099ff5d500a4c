"""SPKD: similarity-preserving knowledge distillation (match the batch's pairwise activation similarities).

F. Tung, G. Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, https://arxiv.org/abs/1907.09682
(torchdistill 1.1.5: ``SPKDLoss``)

With ``Q`` a network's feature map flattened per sample (B x D), the B x B similarity ``G = Q Q^T`` has its rows
L2-normalised; student and teacher may differ in channels and size::

    L_SP = 1/B^2 * || n(G_t) - n(G_s) ||_F^2          (reduction batchmean; 'sum' leaves out the 1/B^2)

ImageNet (ResNet-34 -> ResNet-18, torchdistill's ``configs/sample/ilsvrc2012/spkd``: CE + SPKD on layer4, SGD lr 1e-4,
20 epochs)::

    - {name: ce, type: cross_entropy, weight: 1.0}
    - {name: spkd, type: spkd, weight: 1.0, args: {reduction: batchmean},
       inputs: {student: "student:layer4", teacher: "teacher:layer4"}}
"""
from __future__ import annotations

from typing import Literal, Mapping

import torch
from pydantic import Field
from torch.nn import functional as F

from ..errors import ShapeError
from ..registry import register_loss
from .args import MethodArgs
from .base import DistillLoss, Shape, _fmt


class SPKDArgs(MethodArgs):
    reduction: Literal["batchmean", "sum"] = Field("batchmean", description="'batchmean' (divide by B^2) or 'sum'")


def similarity(z: torch.Tensor) -> torch.Tensor:
    """Row-normalised B x B similarity of the flattened features."""
    z = z.flatten(1)
    return F.normalize(z @ z.t(), dim=1)


@register_loss("spkd")
class SPKDLoss(DistillLoss):
    """``||n(G_t) - n(G_s)||_F^2 / B^2`` (batchmean) of the row-normalised batch similarity matrices."""

    inputs = ("student", "teacher")
    Args = SPKDArgs

    def __init__(self, reduction: str = "batchmean"):
        super().__init__()
        if reduction not in ("batchmean", "sum"):
            raise ValueError(f"reduction must be 'batchmean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        s, t = shapes.get("student"), shapes.get("teacher")
        if s is not None and t is not None and s[0] != t[0]:
            raise ShapeError(f"{where}: spkd compares samples pairwise: {taps['student']} (shape {_fmt(s)}) and "
                             f"{taps['teacher']} (shape {_fmt(t)}) must have the same batch size")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        b = student.shape[0]
        diff = similarity(teacher) - similarity(student)
        loss = (diff * diff).sum()
        return loss / (b * b) if self.reduction == "batchmean" else loss
