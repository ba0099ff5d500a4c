"""RKD: relational knowledge distillation (distance-wise and angle-wise relations of a batch's embeddings).

W. Park, D. Kim, Y. Lu, M. Cho, "Relational Knowledge Distillation", CVPR 2019, https://arxiv.org/abs/1904.05068
(torchdistill 1.1.5: ``RKDLoss``, refactored from the authors' code)

With ``e_i`` the flattened embeddings of a batch, ``d_ij = ||e_i - e_j||`` (diagonal 0, squared distances clamped
at 1e-12 before the root) divided by the mean of its non-zero entries, and
``a_ijk = <n(e_i - e_j), n(e_i - e_k)>`` (n: L2 normalisation)::

    L_RKD = dist_factor * SmoothL1(d^s, d^t) + angle_factor * SmoothL1(a^s, a^t)      (mean reduction)

ImageNet (ResNet-34 -> ResNet-18, torchdistill's ``configs/sample/ilsvrc2012/rkd``: its KD term with alpha 1 is plain
cross-entropy; layer4 maps, dist 1, angle 2; Adam, 20 epochs)::

    - {name: ce, type: cross_entropy, weight: 1.0}
    - {name: rkd, type: rkd, weight: 1.0, args: {dist_factor: 1.0, angle_factor: 2.0},
       inputs: {student: "student:layer4", teacher: "teacher:layer4"}}

The angle term builds a B x B x B tensor: memory grows with the cube of the batch size.
"""
from __future__ import annotations

from typing import Literal, Mapping

import torch
from pydantic import Field
from torch.nn import functional as F

from ..errors import ShapeError
from .registry import register_loss
from .args import MethodArgs, NonNegative
from .base import DistillLoss, Shape, _fmt, check_reduction


class RKDArgs(MethodArgs):
    dist_factor: NonNegative = Field(1.0, description="weight of the distance-wise term, >= 0 (0 leaves it out)")
    angle_factor: NonNegative = Field(2.0, description="weight of the angle-wise term, >= 0 (0 leaves it out)")
    reduction: Literal["mean", "sum"] = Field("mean", description="SmoothL1's reduction: 'mean' or 'sum'")


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``e`` (squared distances clamped at ``eps``), diagonal zero."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1.0 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(e)
    return d / d[d > 0].mean()


def _angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


@register_loss("rkd")
class RKDLoss(DistillLoss):
    """``dist_factor * SmoothL1(distances) + angle_factor * SmoothL1(angles)`` on the flattened embeddings."""

    inputs = ("student", "teacher")
    Args = RKDArgs

    def __init__(self, dist_factor: float = 1.0, angle_factor: float = 2.0, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        self.dist_factor, self.angle_factor, self.reduction = float(dist_factor), float(angle_factor), reduction

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        s, t = shapes.get("student"), shapes.get("teacher")
        if s is not None and t is not None and s[0] != t[0]:
            raise ShapeError(f"{where}: rkd compares samples pairwise: {taps['student']} (shape {_fmt(s)}) and "
                             f"{taps['teacher']} (shape {_fmt(t)}) must have the same batch size")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = student.flatten(1), teacher.detach().flatten(1)
        loss = student.new_zeros(())
        if self.dist_factor:
            loss = loss + self.dist_factor * F.smooth_l1_loss(_normalised_distances(s), _normalised_distances(t),
                                                              reduction=self.reduction)
        if self.angle_factor:
            loss = loss + self.angle_factor * F.smooth_l1_loss(_angles(s), _angles(t), reduction=self.reduction)
        return loss
