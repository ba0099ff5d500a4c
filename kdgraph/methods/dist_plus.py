"""DIST+: DIST's logit relations plus channel and spatial relations of a feature map.

T. Huang, S. You, F. Wang, C. Qian, C. Xu, "DIST+: Knowledge Distillation From a Stronger Adaptive Teacher",
IEEE TPAMI 2025, https://ieeexplore.ieee.org/document/10938241

With ``rho`` the Pearson correlation, ``P = softmax(z / tau)`` (B x C) and feature maps ``F`` (B x K x H x W)::

    L_inter   = tau^2 * (1 - mean_i rho(P_s[i, :], P_t[i, :]))               (as DIST)
    L_intra   = tau^2 * (1 - mean_c rho(P_s[:, c], P_t[:, c]))               (as DIST)
    L_channel = 1 - mean_{b,h,w} rho(F_s[b, :, h, w], F_t[b, :, h, w])       (across channels, each position)
    L_spatial = 1 - mean_{h,w} rho(A_s[:, h, w], A_t[:, h, w]),  A = sum_k F[:, k]   (across the batch)
    L_DIST+   = beta * L_inter + gamma * L_intra + iota * L_channel + kappa * L_spatial

The weight names follow torchdistill 1.1.5's ``DISTPlusLoss`` code (its docstring maps iota / kappa / gamma to
other terms; the code, which produced its number, is what is kept).

**The channel term** (``channel_relation``). torchdistill's ``channel_relation`` returns ``+mean rho``, not
``1 - mean rho``, and adds it with ``+iota``: identical features give +1, opposite ones -1, so minimising the
loss pushes the student's features to be *anti*-correlated with the teacher's across channels. kdgraph implements
the paper's intent, ``1 - rho`` (``channel_relation: paper``, the default); ``channel_relation: torchdistill``
reproduces torchdistill's ``+rho`` exactly (parity-tested). torchdistill's published ImageNet number for DIST+
(71.37, row added 2025-07-26; the loss code unchanged since 2025-06-28 but for formatting) was produced by the
``torchdistill`` behaviour; the paper's 72.39 by the authors' implementation. Both modes have the same gradient
magnitude: they differ in its sign on the channel term (and by the constant iota in value).

ImageNet (ResNet-34 -> ResNet-18, torchdistill's ``configs/sample/ilsvrc2012/dist_plus``)::

    - {name: ce, type: cross_entropy, weight: 1.0}
    - {name: dist_plus, type: dist_plus, weight: 2.0,
       args: {beta: 2.0, gamma: 2.0, iota: 1.0, kappa: 1.0, tau: 1.0},
       inputs: {student: "student:@output", teacher: "teacher:@output",
                student_feature: "student:layer4", teacher_feature: "teacher:layer4"}}
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .registry import register_loss
from .args import MethodArgs, NonNegative, Positive
from .base import DistillLoss
from .dist import DISTLoss, pearson_rows


class DISTPlusArgs(MethodArgs):
    beta: NonNegative = Field(1.0, description="weight of the inter-class logit term, >= 0")
    gamma: NonNegative = Field(1.0, description="weight of the intra-class logit term, >= 0")
    iota: NonNegative = Field(1.0, description="weight of the channel relation term, >= 0")
    kappa: NonNegative = Field(1.0, description="weight of the spatial relation term, >= 0")
    tau: Positive = Field(1.0, description="softmax temperature of the logit terms, > 0")
    eps: Positive = Field(1e-8, description="guard of the correlations' denominators, > 0")
    channel_relation: Literal["paper", "torchdistill"] = Field(
        "paper", description="'paper': 1 - mean Pearson correlation across channels (the paper's intent); "
                             "'torchdistill': + mean correlation, torchdistill 1.1.5's code, which rewards "
                             "anti-correlated features")


def channel_correlation(f_s: torch.Tensor, f_t: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean Pearson correlation across channels (dim 1) at every sample and position (torchdistill's formula)."""
    c_s = f_s - f_s.mean(dim=1, keepdim=True)
    c_t = f_t - f_t.mean(dim=1, keepdim=True)
    num = (c_s * c_t).sum(dim=1)
    den = torch.sqrt((c_s * c_s).sum(dim=1) * (c_t * c_t).sum(dim=1))
    return (num / (den + eps)).mean()


@register_loss("dist_plus")
class DISTPlusLoss(DistillLoss):
    """DIST on the logits plus the channel and spatial relation terms of one feature map pair."""

    inputs = ("student", "teacher", "student_feature", "teacher_feature")
    default_inputs = {"student": "student:@output", "teacher": "teacher:@output"}
    same_shape = (("student", "teacher"), ("student_feature", "teacher_feature"))
    Args = DISTPlusArgs

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, iota: float = 1.0, kappa: float = 1.0,
                 tau: float = 1.0, eps: float = 1e-8, channel_relation: str = "paper"):
        super().__init__()
        if channel_relation not in ("paper", "torchdistill"):
            raise ValueError(f"channel_relation must be 'paper' or 'torchdistill', got {channel_relation!r}")
        self.dist = DISTLoss(beta=beta, gamma=gamma, tau=tau, eps=eps)
        self.iota, self.kappa, self.eps = float(iota), float(kappa), float(eps)
        self.channel_relation = channel_relation

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, student_feature: torch.Tensor,
                teacher_feature: torch.Tensor) -> torch.Tensor:
        rho_c = channel_correlation(student_feature, teacher_feature, self.eps)
        channel = rho_c if self.channel_relation == "torchdistill" else 1.0 - rho_c
        a_s = student_feature.sum(dim=1).flatten(1).t()  # (H*W) x B: each position across the batch
        a_t = teacher_feature.sum(dim=1).flatten(1).t()
        spatial = 1.0 - pearson_rows(a_s, a_t, self.eps).mean()
        return self.dist(student, teacher) + self.iota * channel + self.kappa * spatial
