"""CCKD: correlation congruence (sample-to-sample correlations of embeddings).

B. Peng, X. Jin, J. Liu, D. Li, Y. Wu, Y. Liu, S. Zhou, Z. Zhang, "Correlation Congruence for Knowledge
Distillation", ICCV 2019, https://arxiv.org/abs/1904.01802

Both networks' pooled features are embedded by a linear layer (kdgraph's ``connector`` with ``layer: linear``; the
teacher's trains too, its backbone frozen). The correlation matrix of the B embeddings f_1..f_B (B x B) is, with
the Gaussian RBF kernel approximated by its Taylor series up to order P (paper, eq. 9)::

    C[i, j] = exp(-2 gamma) * sum_{p=0..P} (2 gamma)^p / p! * (f_i . f_j)^p      (kernel: gaussian)
    C[i, j] = f_i . f_j                                                          (kernel: bilinear)
    L_CC    = || C_s - C_t ||_2 / B^2                    (Frobenius norm; reduction: sum drops the 1/B^2)

ImageNet (20 epochs, SGD lr 1e-4): the KD soft term at T = 1 alone (torchdistill's KDLoss with alpha 0, no
cross-entropy) + 0.003 CC, gamma 0.4, P = 2, 128-d embeddings of the avgpool outputs::

    adapters:
      student_linear: {type: connector, inputs: {x: "student:avgpool"}, args: {layer: linear, out_features: 128}}
      teacher_linear: {type: connector, inputs: {x: "teacher:avgpool"}, args: {layer: linear, out_features: 128}}
    losses:
      - {name: kd, type: kd, args: {temperature: 1.0}}
      - {name: cckd, type: cckd, weight: 0.003, args: {kernel: gaussian, gamma: 0.4, max_p: 2},
         inputs: {student: "adapter:student_linear", teacher: "adapter:teacher_linear"}}

torchdistill 1.1.5's sample configuration (``configs/sample/ilsvrc2012/cckd/``) does not load as written: it gives
``kernel_params: {key: gaussian, ...}`` where ``CCKDLoss`` reads ``kernel_config['type']``. kdgraph's arguments are
the loss's own (``kernel``, ``gamma``, ``max_p``, ``reduction``).
"""
from __future__ import annotations

import math
from typing import Literal, Mapping

import torch
from pydantic import Field

from ..errors import ShapeError
from .registry import register_loss
from .args import MethodArgs, NonNegative, PosInt
from .base import DistillLoss, Shape, _fmt


class CCKDArgs(MethodArgs):
    kernel: Literal["gaussian", "bilinear"] = Field("gaussian", description="'gaussian' (Taylor-expanded RBF) or "
                                                                            "'bilinear' (plain dot products)")
    gamma: NonNegative = Field(0.4, description="the Gaussian kernel's gamma, >= 0")
    max_p: PosInt = Field(2, description="the Taylor expansion's order P, >= 1")
    reduction: Literal["batchmean", "sum"] = Field("batchmean", description="'batchmean' (the norm divided by B^2) "
                                                                            "or 'sum'")


def correlation_matrix(f: torch.Tensor, kernel: str, gamma: float, max_p: int) -> torch.Tensor:
    """B x B correlations of the rows of ``f`` (see the module docstring)."""
    dots = f @ f.t()
    if kernel == "bilinear":
        return dots
    out = torch.ones_like(dots)
    for p in range(1, max_p + 1):
        out = out + ((2 * gamma) ** p / math.factorial(p)) * dots ** p
    return out * math.exp(-2 * gamma)


@register_loss("cckd")
class CCKDLoss(DistillLoss):
    """``||C(student) - C(teacher)||_F / B^2`` on two B x D embeddings (D may differ)."""

    inputs = ("student", "teacher")
    Args = CCKDArgs

    def __init__(self, kernel: str = "gaussian", gamma: float = 0.4, max_p: int = 2, reduction: str = "batchmean"):
        super().__init__()
        if kernel not in ("gaussian", "bilinear"):
            raise ValueError(f"kernel must be 'gaussian' or 'bilinear', got {kernel!r}")
        if reduction not in ("batchmean", "sum"):
            raise ValueError(f"reduction must be 'batchmean' or 'sum', got {reduction!r}")
        self.kernel, self.gamma, self.max_p, self.reduction = kernel, float(gamma), int(max_p), reduction

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        for name in cls.inputs:
            s = shapes.get(name)
            if s is not None and len(s) != 2:
                raise ShapeError(f"{where}: cckd compares B x D embeddings, but input {name!r} ({taps[name]}) has "
                                 f"shape {_fmt(s)}; put a connector with layer: linear in between")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        c_s = correlation_matrix(student, self.kernel, self.gamma, self.max_p)
        c_t = correlation_matrix(teacher, self.kernel, self.gamma, self.max_p)
        loss = (c_s - c_t).norm()
        return loss / student.shape[0] ** 2 if self.reduction == "batchmean" else loss
