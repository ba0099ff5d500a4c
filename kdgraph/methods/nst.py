"""NST: neuron selectivity transfer (squared MMD of the channels' spatial activation patterns).

Z. Huang, N. Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", 2017,
https://arxiv.org/abs/1707.01219 (code: megvii-research/mdistiller, ``mdistiller/distillers/NST.py``)

Each channel of a B x C x H x W map is one sample ``f^i`` (its H*W activations, L2-normalised); with the
polynomial kernel ``k(x, y) = (x . y)^2`` (d = 2, c = 0), per image::

    L_NST = mean_{i,i'} k(f_t^i, f_t^i') + mean_{j,j'} k(f_s^j, f_s^j') - 2 mean_{i,j} k(f_s^j, f_t^i)

averaged over the batch (the teacher-teacher term carries no gradient). Channel counts may differ; when the maps'
sizes differ the larger one is average-pooled to the smaller (as the authors' code). One loss entry per tapped pair
(mdistiller: the four stage outputs, weight 50 each, CIFAR-100; no ImageNet setting published)::

    - {name: nst_layer4, type: nst, weight: 50.0, inputs: {student: "student:layer4", teacher: "teacher:layer4"}}
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch.nn import functional as F

from ..errors import ShapeError
from .registry import register_loss
from .args import NoArgs
from .base import DistillLoss, Shape, _fmt


def _poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean_{i,j} (a_i . b_j)^2`` over the channel pairs of each image, then over the batch."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


@register_loss("nst")
class NSTLoss(DistillLoss):
    """Squared MMD (polynomial kernel, d = 2) between the channels' normalised spatial patterns."""

    inputs = ("student", "teacher")
    Args = NoArgs

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        s, t = shapes.get("student"), shapes.get("teacher")
        if s is None or t is None:
            return
        if len(s) != 4 or len(t) != 4 or s[0] != t[0]:
            raise ShapeError(f"{where}: NST compares B x C x H x W feature maps of the same batch, but "
                             f"{taps['student']} has shape {_fmt(s)} and {taps['teacher']} {_fmt(t)}; tap "
                             f"convolutional layers (channels and sizes may differ)")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        hs, ht = student.shape[2], teacher.shape[2]
        if hs > ht:
            student = F.adaptive_avg_pool2d(student, (ht, ht))
        elif hs < ht:
            teacher = F.adaptive_avg_pool2d(teacher, (hs, hs))
        f_s = F.normalize(student.flatten(2), dim=2)
        f_t = F.normalize(teacher.flatten(2), dim=2)
        return (_poly_kernel_mean(f_t, f_t).detach() + _poly_kernel_mean(f_s, f_s)
                - 2 * _poly_kernel_mean(f_s, f_t))
