"""SPKD: similarity-preserving knowledge distillation (match the batch's pairwise activation similarities).

F. Tung, G. Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, https://arxiv.org/abs/1907.09682
(torchdistill 1.1.5: ``SPKDLoss``)

With ``Q`` a network's feature map flattened per sample (B x D), the B x B similarity ``G = Q Q^T`` has its rows
L2-normalised; student and teacher may differ in channels and size::

    L_SP = 1/B^2 * || n(G_t) - n(G_s) ||_F^2          (reduction batchmean; 'sum' leaves out the 1/B^2)

**Row normalisation** (``normalization``). The paper divides each row of ``G`` by its L2 norm (``paper``, the
default; also what RepDistiller's widely used implementation does). torchdistill 1.1.5's ``SPKDLoss`` calls
``normalize(G, 1)``, whose second positional argument is the norm's order ``p``: it divides each row by its **L1**
norm. ``normalization: torchdistill`` reproduces that exactly (parity-tested); torchdistill publishes no ImageNet
number for SPKD, so no published result depends on the choice.

ImageNet (ResNet-34 -> ResNet-18, torchdistill's ``configs/sample/ilsvrc2012/spkd``: CE + SPKD on layer4, SGD lr 1e-4,
20 epochs)::

    - {name: ce, type: cross_entropy, weight: 1.0}
    - {name: spkd, type: spkd, weight: 1.0, args: {reduction: batchmean, normalization: paper},
       inputs: {student: "student:layer4", teacher: "teacher:layer4"}}
"""
from __future__ import annotations

from typing import Literal, Mapping

import torch
from pydantic import Field
from torch.nn import functional as F

from ..errors import ShapeError
from .registry import register_loss
from .args import MethodArgs
from .base import DistillLoss, Shape, _fmt


class SPKDArgs(MethodArgs):
    reduction: Literal["batchmean", "sum"] = Field("batchmean", description="'batchmean' (divide by B^2) or 'sum'")
    normalization: Literal["paper", "torchdistill"] = Field(
        "paper", description="'paper': rows of G divided by their L2 norm; 'torchdistill': by their L1 norm "
                             "(torchdistill 1.1.5's normalize(G, 1))")


def similarity(z: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """B x B similarity of the flattened features, each row divided by its ``p``-norm."""
    z = z.flatten(1)
    return F.normalize(z @ z.t(), p=p, dim=1)


@register_loss("spkd")
class SPKDLoss(DistillLoss):
    """``||n(G_t) - n(G_s)||_F^2 / B^2`` (batchmean) of the row-normalised batch similarity matrices."""

    inputs = ("student", "teacher")
    Args = SPKDArgs

    def __init__(self, reduction: str = "batchmean", normalization: str = "paper"):
        super().__init__()
        if reduction not in ("batchmean", "sum"):
            raise ValueError(f"reduction must be 'batchmean' or 'sum', got {reduction!r}")
        if normalization not in ("paper", "torchdistill"):
            raise ValueError(f"normalization must be 'paper' or 'torchdistill', got {normalization!r}")
        self.reduction = reduction
        self.p = 2.0 if normalization == "paper" else 1.0

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        s, t = shapes.get("student"), shapes.get("teacher")
        if s is not None and t is not None and s[0] != t[0]:
            raise ShapeError(f"{where}: spkd compares samples pairwise: {taps['student']} (shape {_fmt(s)}) and "
                             f"{taps['teacher']} (shape {_fmt(t)}) must have the same batch size")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        b = student.shape[0]
        diff = similarity(teacher, self.p) - similarity(student, self.p)
        loss = (diff * diff).sum()
        return loss / (b * b) if self.reduction == "batchmean" else loss
