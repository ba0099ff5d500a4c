"""MLKD: multi-level logit distillation (instance, batch and class relations of two views, several temperatures).

Y. Jin, J. Wang, D. Lin, "Multi-Level Logit Distillation", CVPR 2023 (code: Jin-Ying/Multi-Level-Logit-Distillation,
``mdistiller/distillers/KD_ours.py``)

Each image is seen twice, a weak and a strong view (the ``mlkd_views`` transform stacks the strong view after the
batch: a general multi-view stage, as SSKD's rotations). With ``p = softmax(z / T)`` over temperatures
``T in {temperature, 3, 5, 2, 6}``::

    kd(T) = T^2 KL(p_t || p_s) (per sample, batch mean)      instance level
    bc(T) = sum (P_t P_t^T - P_s P_s^T)^2 / B                batch level (B x B similarity of the samples)
    cc(T) = sum (P_t^T P_t - P_s^T P_s)^2 / C                class level (C x C similarity of the classes)

The weak view's kd and bc terms count for the samples whose teacher confidence is at most the batch median (times
the share of such samples), its cc term for the classes whose summed teacher probability is at most the median.
``variant: paper`` (default) sums kd, cc and bc of both views; ``variant: code`` reproduces the authors' code,
which leaves the strong view's cc and bc out and scores its kd at T = 2 and 6 on the weak view's logits. The
published ImageNet figure comes from the code. ``strong_ce`` adds ``strong_ce * CE(strong view)`` (the code trains
CE on both views; ``cross_entropy`` scores the first, weak, view). ImageNet (``configs/imagenet/r34_r18/kd_ours.yaml``:
T 1, CE 0.5, KD 0.5)::

    transform: {type: mlkd_views}
    losses:
      - {name: ce, type: cross_entropy, weight: 0.5}
      - {name: mlkd, type: mlkd, weight: 0.5, args: {temperature: 1.0, variant: code}}
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from ..errors import ShapeError
from .registry import register_loss, register_transform
from .args import Fraction, MethodArgs, NonNegative, Positive
from .base import DistillLoss, InputTransform

EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)


class MLKDArgs(MethodArgs):
    temperature: Positive = Field(4.0, description="the first temperature, > 0 (3, 5, 2 and 6 follow)")
    variant: Literal["paper", "code"] = Field("paper", description="'paper': every level on both views; 'code': "
                                              "the authors' code (strong cc / bc dropped, weak logits at T 2, 6)")
    strong_ce: NonNegative = Field(1.0, description="weight of the strong view's cross-entropy, >= 0")


class MLKDViewsArgs(MethodArgs):
    min_scale: Fraction = Field(0.08, description="smallest area share of the strong view's random crop")
    cutout: Fraction = Field(0.5, description="largest side share of the strong view's cutout square")


def _kd(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    kl = F.kl_div(F.log_softmax(s / temp, dim=1), F.softmax(t / temp, dim=1), reduction="none").sum(1).mean()
    return kl * temp ** 2


def _cc(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    ps, pt = F.softmax(s / temp, dim=1), F.softmax(t / temp, dim=1)
    return ((pt.t() @ pt - ps.t() @ ps) ** 2).sum() / s.shape[1]


def _bc(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    ps, pt = F.softmax(s / temp, dim=1), F.softmax(t / temp, dim=1)
    return ((pt @ pt.t() - ps @ ps.t()) ** 2).sum() / s.shape[0]


@register_loss("mlkd")
class MLKDLoss(DistillLoss):
    """Instance, batch and class relation terms of the weak and strong views at five temperatures."""

    inputs = ("student", "teacher", "targets")
    default_inputs = {"student": "student:@output", "teacher": "teacher:@output", "targets": "batch:targets"}
    same_shape = (("student", "teacher"),)
    batch_only_inputs = ("targets",)
    Args = MLKDArgs

    def __init__(self, temperature: float = 4.0, variant: str = "paper", strong_ce: float = 1.0):
        super().__init__()
        if temperature <= 0 or variant not in ("paper", "code") or strong_ce < 0:
            raise ValueError(f"need temperature > 0, variant 'paper' or 'code', strong_ce >= 0; got {temperature}, "
                             f"{variant!r}, {strong_ce}")
        self.temperature, self.variant, self.strong_ce = float(temperature), variant, float(strong_ce)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        b = targets.shape[0]
        if student.shape[0] != 2 * b:
            raise ShapeError(f"mlkd: expected the weak and the strong view of {b} images ({2 * b} rows: add "
                             f"`transform: {{type: mlkd_views}}` to the stage), got {student.shape[0]} rows")
        sw, ss, tw, ts = student[:b], student[b:], teacher[:b], teacher[b:]
        with torch.no_grad():
            p_tw = F.softmax(tw.float(), dim=1)
            conf = p_tw.max(dim=1).values
            share = (conf <= torch.quantile(conf, 0.5)).float().mean()
            class_conf = p_tw.sum(dim=0)
            class_share = (class_conf <= torch.quantile(class_conf, 0.5)).float().mean()
        temps = (self.temperature, *EXTRA_TEMPERATURES)
        code = self.variant == "code"
        loss = student.new_zeros(())
        for i, temp in enumerate(temps):
            late = code and i >= 3  # the code's strong-view kd at T = 2, 6 reads the weak view
            loss = loss + _kd(sw, tw, temp) * share + (_kd(sw, tw, temp) if late else _kd(ss, ts, temp))
            loss = loss + _cc(sw, tw, temp) * class_share + _bc(sw, tw, temp) * share
            if not code:
                loss = loss + _cc(ss, ts, temp) + _bc(ss, ts, temp) * share
        if self.strong_ce:
            loss = loss + self.strong_ce * F.cross_entropy(ss, targets)
        return loss


@register_transform("mlkd_views")
class MLKDViews(InputTransform):
    """B x C x H x W -> 2B: ``[x, strong(x)]``, strong = per-image random resized crop + flip + cutout.

    The authors draw the strong view from the raw image (RandomResizedCrop, flip, RandAugment(2, 10), Cutout, in
    PIL); here it is made from the batch's (weak) view, in the graph, without RandAugment's colour operations.
    """

    Args = MLKDViewsArgs

    def __init__(self, min_scale: float = 0.08, cutout: float = 0.5):
        super().__init__()
        self.min_scale, self.cutout = float(min_scale), float(cutout)

    def _strong(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w = x.shape
        area = h * w * float(torch.empty(()).uniform_(self.min_scale, 1.0))
        ratio = float(torch.empty(()).uniform_(3 / 4, 4 / 3))
        ch = max(1, min(h, round((area / ratio) ** 0.5)))
        cw = max(1, min(w, round((area * ratio) ** 0.5)))
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        y = F.interpolate(x[None, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                          align_corners=False)[0]
        if bool(torch.rand(()) < 0.5):
            y = y.flip(-1)
        side = int(float(torch.rand(())) * self.cutout * min(h, w))
        if side:
            cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
            y = y.clone()
            y[:, max(0, cy - side // 2):cy + side // 2 + 1, max(0, cx - side // 2):cx + side // 2 + 1] = 0
        return y

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise ShapeError(f"mlkd_views: expected B x C x H x W images, got shape {list(images.shape)}")
        if not self.training:
            return torch.cat([images, images], 0)
        return torch.cat([images, torch.stack([self._strong(x) for x in images])], 0)
