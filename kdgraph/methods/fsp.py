"""FSP: distillation of the flow of solution procedure (Gram matrices between two layers), two stages.

J. Yim, D. Joo, J. Bae, J. Kim, "A Gift From Knowledge Distillation: Fast Optimization, Network Minimization and
Transfer Learning", CVPR 2017, https://openaccess.thecvf.com/content_cvpr_2017/html/Yim_A_Gift_From_CVPR_2017_paper.html

The FSP matrix of two maps F1 (B x C1 x H1 x W1) and F2 (B x C2 x H2 x W2) of one network, both brought to
h x w = min(H1, H2) x min(W1, W2) by adaptive max pooling where larger::

    G(F1, F2)[b, i, j] = 1 / (h w) * sum_{x, y} F1[b, i, x, y] * F2[b, j, x, y]          (B x C1 x C2)
    L_FSP = 1/B * sum_b sum_j || G_s[b, :, j] - G_t[b, :, j] ||_2

(the L2 norm over the first channel axis, summed over the second and over the batch, divided by the batch size:
torchdistill 1.1.5's ``FSPLoss`` per pair; its sum over pairs is one kdgraph term per pair). The student's and the
teacher's matrices must have the same shape (C1 and C2 of both networks agree, as in ResNet-34 -> ResNet-18).

Stage 1 of the ImageNet configuration (5 epochs, Adam lr 1e-4) trains the student with the four FSP terms only, the
FSP pair of each stage being (the stage's input, its output) or (the second block's input, the stage's output)::

    - {name: fsp_layer1, type: fsp, weight: 1.0,
       inputs: {student_first: "student:layer1@input", student_second: "student:layer1",
                teacher_first: "teacher:layer1@input", teacher_second: "teacher:layer1"}}
    - {name: fsp_layer2, type: fsp, weight: 1.0,
       inputs: {student_first: "student:layer2.1@input", student_second: "student:layer2",
                teacher_first: "teacher:layer2.1@input", teacher_second: "teacher:layer2"}}

Stage 2 trains the student with cross-entropy alone.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch.nn import functional as F

from ..errors import ShapeError
from .registry import register_loss
from .args import NoArgs
from .base import DistillLoss, Shape, _fmt


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``B x C1 x C2`` FSP matrix of two maps, the larger one max-pooled to the smaller's H x W."""
    h, w = min(first.shape[2], second.shape[2]), min(first.shape[3], second.shape[3])
    if tuple(first.shape[2:]) != (h, w):
        first = F.adaptive_max_pool2d(first, (h, w))
    if tuple(second.shape[2:]) != (h, w):
        second = F.adaptive_max_pool2d(second, (h, w))
    return torch.bmm(first.flatten(2), second.flatten(2).transpose(1, 2)) / (h * w)


@register_loss("fsp")
class FSPLoss(DistillLoss):
    """``1/B sum_b sum_j ||G_s[b, :, j] - G_t[b, :, j]||_2`` for one pair of layers (see the module docstring)."""

    inputs = ("student_first", "student_second", "teacher_first", "teacher_second")
    Args = NoArgs

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        for name, s in shapes.items():
            if s is not None and len(s) != 4:
                raise ShapeError(f"{where}: fsp needs N x C x H x W maps, but input {name!r} ({taps[name]}) has "
                                 f"shape {_fmt(s)}")
        for side in ("student", "teacher"):
            a, b = shapes.get(f"{side}_first"), shapes.get(f"{side}_second")
            if a is not None and b is not None and a[0] != b[0]:
                raise ShapeError(f"{where}: {taps[side + '_first']} and {taps[side + '_second']} have different "
                                 f"batch sizes ({_fmt(a)}, {_fmt(b)})")
        got = {n: shapes.get(n) for n in cls.inputs}
        if all(v is not None for v in got.values()):
            s_mat = (got["student_first"][1], got["student_second"][1])
            t_mat = (got["teacher_first"][1], got["teacher_second"][1])
            if s_mat != t_mat:
                raise ShapeError(
                    f"{where}: the student's FSP matrix is {s_mat[0]} x {s_mat[1]} ({taps['student_first']}, "
                    f"{taps['student_second']}) but the teacher's is {t_mat[0]} x {t_mat[1]} "
                    f"({taps['teacher_first']}, {taps['teacher_second']}); tap layers whose channel counts agree")

    def forward(self, student_first: torch.Tensor, student_second: torch.Tensor,
                teacher_first: torch.Tensor, teacher_second: torch.Tensor) -> torch.Tensor:
        diff = fsp_matrix(student_first, student_second) - fsp_matrix(teacher_first, teacher_second)
        return diff.norm(dim=1).sum() / student_first.shape[0]
