"""AT: attention transfer.

S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017, https://arxiv.org/abs/1612.03928

Attention map of a feature map F (B x C x H x W), "code" variant (the authors' implementation)::

    a(F) = normalize_L2( mean_c(F^2).flatten(1) )          L_AT = mean( (a(F_s) - a(F_t))^2 )

"paper" variant: ``a(F) = normalize_L2(sum_c F^2)``, ``L_AT = 1/B * sum_i ||a_s,i - a_t,i||_2``.
One loss entry per tapped pair (weight 1000 each for ImageNet)::

    - {name: at_layer3, type: at, weight: 1000,
       inputs: {student: "student:layer3", teacher: "teacher:layer3"}}
"""
from __future__ import annotations

from typing import Literal, Mapping

import torch
from torch.nn import functional as F

from ..errors import ShapeError
from pydantic import Field

from .registry import register_loss
from .args import MethodArgs
from .base import DistillLoss, Shape


class ATArgs(MethodArgs):
    mode: Literal["code", "paper"] = Field("code", description="'code' (the authors' implementation) or 'paper'")


def attention_map(feature_map: torch.Tensor, mode: str = "code") -> torch.Tensor:
    """L2-normalised spatial attention of a B x C x H x W map, flattened to B x HW."""
    energy = feature_map.pow(2)
    energy = energy.mean(1) if mode == "code" else energy.sum(1)
    return F.normalize(energy.flatten(1), dim=1)


@register_loss("at")
class ATLoss(DistillLoss):
    """Attention transfer between one student and one teacher feature map (same H x W)."""

    inputs = ("student", "teacher")
    Args = ATArgs

    def __init__(self, mode: Literal["code", "paper"] = "code"):
        super().__init__()
        if mode not in ("code", "paper"):
            raise ValueError(f"mode must be 'code' or 'paper', got {mode!r}")
        self.mode = mode

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        s, t = shapes.get("student"), shapes.get("teacher")
        if s is None or t is None:
            return
        if len(s) != 4 or len(t) != 4 or s[0] != t[0] or tuple(s[2:]) != tuple(t[2:]):
            raise ShapeError(
                f"{where}: AT compares spatial attention maps, so {taps['student']} (shape {list(s)}) and "
                f"{taps['teacher']} (shape {list(t)}) need B x C x H x W maps with the same batch and H x W "
                f"(channels may differ).")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        a_s, a_t = attention_map(student, self.mode), attention_map(teacher, self.mode)
        if self.mode == "code":
            return (a_s - a_t).pow(2).mean()
        return (a_s - a_t).norm(dim=1).sum() / student.shape[0]
