"""KDSVD: distillation of the singular-vector relations between consecutive feature maps.

S. H. Lee, D. H. Kim, B. C. Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition",
ECCV 2018, https://arxiv.org/abs/1807.06819 (code: megvii-research/mdistiller ``mdistiller/distillers/KDSVD.py``,
a port of the authors' TensorFlow sseung0703/SSKD_SVD)

Each map is a matrix per image; its first ``k`` right singular vectors ``V`` (the student's: ``k + 3``,
sign-aligned to the teacher's best matching ones), scaled by the teacher's normalised singular values, summarise
it. For two consecutive maps ``a``, ``b`` the relation is an RBF ``G = exp(-(v_b,i - v_a,j)^2 / 8)`` over every
pair of rows; the loss is ``1/B * sum (G_s - G_t)^2`` (non-finite entries dropped).

``layout: paper`` (default) decomposes the ``HW x C`` matrix of each image, as the authors' NHWC code;
student and teacher maps then need equal channels. ``layout: mdistiller`` reproduces mdistiller's NCHW port
(``view(B, C*H, W)``, a ``CH x W`` matrix: equal widths needed). One entry per consecutive pair of taps
(mdistiller: CIFAR-100 only, k 1, weight 1; no ImageNet figure published)::

    - {name: svd_34, type: kdsvd, weight: 1.0, args: {k: 1},
       inputs: {student_a: "student:layer3", student_b: "student:layer4",
                teacher_a: "teacher:layer3", teacher_b: "teacher:layer4"}}
"""
from __future__ import annotations

from typing import Literal, Mapping

import torch
from pydantic import Field
from torch.nn import functional as F

from ..errors import ShapeError
from .registry import register_loss
from .args import MethodArgs, PosInt
from .base import DistillLoss, Shape, _fmt


class KDSVDArgs(MethodArgs):
    k: PosInt = Field(1, description="number of the teacher's singular vectors kept, >= 1 (the student keeps k + 3)")
    layout: Literal["paper", "mdistiller"] = Field(
        "paper", description="'paper': an HW x C matrix per image (the authors' NHWC code); 'mdistiller': "
                             "mdistiller's NCHW view, a CH x W matrix")


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def top_singular(feat: torch.Tensor, n: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised first ``n`` singular values (B x n) and right singular vectors (B x cols x n) of each image."""
    if layout == "paper":
        feat = feat.permute(0, 2, 3, 1)
    b, c, h, w = feat.shape
    x = feat.reshape(b, c * h, w).float()
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    s, v = _finite(s), _finite(vh.mH)
    return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)


def align_signs(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """For each teacher vector, the student vector of largest |cosine|, with the cosine's sign."""
    cosine = torch.matmul(v_s.transpose(-2, -1), v_t)
    best = torch.abs(cosine).max(1, keepdim=True).values
    mask = torch.where(torch.eq(best, torch.abs(cosine)), torch.sign(cosine), torch.zeros_like(cosine))
    return torch.matmul(v_s, mask)


def _rbf(v: torch.Tensor, v_prev: torch.Tensor) -> torch.Tensor:
    return torch.exp(-(v.unsqueeze(2) - v_prev.unsqueeze(1)).pow(2) / 8)


@register_loss("kdsvd")
class KDSVDLoss(DistillLoss):
    """RBF relation of the (scaled) singular vectors of two consecutive maps, student vs teacher."""

    inputs = ("student_a", "student_b", "teacher_a", "teacher_b")
    Args = KDSVDArgs

    def __init__(self, k: int = 1, layout: str = "paper"):
        super().__init__()
        if k < 1 or layout not in ("paper", "mdistiller"):
            raise ValueError(f"need k >= 1 and layout 'paper' or 'mdistiller', got k={k}, layout={layout!r}")
        self.k, self.layout = int(k), layout

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        for pair in ("a", "b"):
            s, t = shapes.get(f"student_{pair}"), shapes.get(f"teacher_{pair}")
            if s is None or t is None:
                continue
            if len(s) != 4 or len(t) != 4:
                raise ShapeError(f"{where}: KDSVD decomposes B x C x H x W maps; {taps[f'student_{pair}']} has "
                                 f"shape {_fmt(s)}, {taps[f'teacher_{pair}']} {_fmt(t)}")
            if s[0] != t[0] or (s[1] != t[1] and s[3] != t[3]):
                raise ShapeError(f"{where}: KDSVD compares right singular vectors, so {taps[f'student_{pair}']} "
                                 f"(shape {_fmt(s)}) and {taps[f'teacher_{pair}']} (shape {_fmt(t)}) need the same "
                                 f"batch and the same channel count (layout 'paper') or width (layout 'mdistiller')")

    def _vectors(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_t, v_t = top_singular(teacher, self.k, self.layout)
        _, v_s = top_singular(student, self.k + 3, self.layout)
        v_s = align_signs(v_s, v_t)
        s_t = s_t.unsqueeze(1)
        return v_s * s_t, v_t * s_t

    def forward(self, student_a: torch.Tensor, student_b: torch.Tensor, teacher_a: torch.Tensor,
                teacher_b: torch.Tensor) -> torch.Tensor:
        vs_a, vt_a = self._vectors(student_a, teacher_a)
        vs_b, vt_b = self._vectors(student_b, teacher_b)
        diff = (_rbf(vs_b, vs_a) - _rbf(vt_b, vt_a).detach()).pow(2)
        return _finite(diff).sum() / student_a.shape[0]
