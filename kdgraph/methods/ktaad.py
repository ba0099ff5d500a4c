"""KTAAD: knowledge translation and adaptation + affinity distillation (``kta``, ``affinity``, ``regularization``).

T. He, C. Shen, Z. Tian, D. Gong, C. Sun, Y. Yan, "Knowledge Adaptation for Efficient Semantic Segmentation",
CVPR 2019, https://arxiv.org/abs/1903.04688

Stage 1 trains an auto-encoder (kdgraph's ``ft_encoder`` / ``ft_decoder``, ``uses_bn: true``) to reconstruct the
teacher's output, its code kept sparse by an L_p ``regularization`` of the encoder's output (weight 1e-7)::

    L_reg = || z ||_p                           (the p-norm of the whole tensor, not a mean; p = 1)

Stage 2 freezes the encoder (the knowledge translator, output E) and trains the student with two adapters on the
same student map: a feature adapter (3x3 conv + BN + ReLU; ``connector`` with ``kernel_size: 3, relu: true``) whose
output A is compared with E, and an affinity adapter (3x3 conv; ``connector`` with ``bn: false``) whose output S
gives spatial affinities compared with E's::

    L_KTA = mean | A / ||A||_q - E / ||E||_q |      (p = 1; per sample, flattened; p >= 2: mean_b ||...||_p)
    L_aff = 1/B * sum_b sum_c || s_c s_c^T - e_c e_c^T ||_F / (H W)

with s_c, e_c the H*W-vectors of channel c of S and E, each L2-normalised. ``affinity`` is computed from the
identity ``||s s^T - e e^T||_F^2 = |s|^4 + |e|^4 - 2 (s . e)^2`` instead of building the (HW x HW) matrices
torchdistill 1.1.5's ``AffinityLoss`` builds per channel (same value; HW-fold less memory). COCO 2017 configuration
(``configs/sample/coco2017/ktaad/``): CE + 50 kta + 1 affinity::

    losses:
      - {name: kta, type: kta, weight: 50.0, args: {p: 1, q: 2},
         inputs: {student: "adapter:feature_adapter", teacher: "adapter:paraphraser_encoder"}}
      - {name: aff, type: affinity, weight: 1.0,
         inputs: {student: "adapter:affinity_adapter", teacher: "adapter:paraphraser_encoder"}}

kdgraph has no segmentation data set yet, so only the losses are here (parity-tested against torchdistill).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from .registry import register_loss
from .args import MethodArgs, PosInt
from .base import DistillLoss, check_reduction


class KTAArgs(MethodArgs):
    p: PosInt = Field(1, description="the norm of the difference: 1 (mean absolute difference) or an integer >= 2")
    q: PosInt = Field(2, description="the norm each flattened map is divided by, an integer >= 1")
    reduction: Literal["mean", "sum"] = Field("mean", description="'mean' or 'sum'")


class AffinityArgs(MethodArgs):
    reduction: Literal["mean", "sum"] = Field("mean", description="'mean' (over the batch) or 'sum'")


class RegularizationArgs(MethodArgs):
    p: PosInt = Field(1, description="the order of the norm, an integer >= 1")


@register_loss("kta")
class KTALoss(DistillLoss):
    """``mean |A/||A||_q - E/||E||_q|`` (p = 1) between flattened student adapter and teacher translator outputs."""

    inputs = ("student", "teacher")
    same_shape = (("student", "teacher"),)
    Args = KTAArgs

    def __init__(self, p: int = 1, q: int = 2, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        self.p, self.q, self.reduction = int(p), int(q), reduction

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        a, e = student.flatten(1), teacher.flatten(1)
        a = a / a.norm(p=self.q, dim=1, keepdim=True)
        e = e / e.norm(p=self.q, dim=1, keepdim=True)
        if self.p == 1:
            return F.l1_loss(a, e, reduction=self.reduction)
        per_sample = (a - e).norm(p=self.p, dim=1)
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


@register_loss("affinity")
class AffinityLoss(DistillLoss):
    """Per-channel spatial affinity difference (see the module docstring), averaged (or summed) over the batch."""

    inputs = ("student", "teacher")
    same_shape = (("student", "teacher"),)
    Args = AffinityArgs

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, e = student.flatten(2), teacher.flatten(2)
        hw = s.shape[2]
        s = s / s.norm(dim=2, keepdim=True)
        e = e / e.norm(dim=2, keepdim=True)
        ss, ee, se = s.square().sum(2), e.square().sum(2), (s * e).sum(2)
        sq = (ss.square() + ee.square() - 2 * se.square()).clamp_min(0)
        # sqrt has an infinite slope at 0 (identical affinities): the gradient there is 0, as torch.norm's
        positive = sq > 0
        norm = torch.where(positive, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), torch.zeros_like(sq))
        per_sample = norm.sum(1) / hw
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


@register_loss("regularization")
class RegularizationLoss(DistillLoss):
    """``||x||_p`` of one tapped tensor (all its entries; torchdistill's RegularizationLoss)."""

    inputs = ("x",)
    Args = RegularizationArgs

    def __init__(self, p: int = 1):
        super().__init__()
        self.p = int(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.norm(p=self.p)
