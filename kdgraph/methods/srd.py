"""SRD: simple recipe distillation (a linear projector, batch-normalised features, a log-sum feature loss).

R. Miles, K. Mikolajczyk, "Understanding the Role of the Projector in Knowledge Distillation", AAAI 2024,
https://arxiv.org/abs/2303.11098 (torchdistill 1.1.5: ``SRDLoss`` + ``SRDModelWrapper``)

Both networks' last feature maps are average-pooled; the student's goes through a linear projector, and both
through a BatchNorm without affine parameters that always normalises with the *batch's* statistics (the
``srd_projector`` adapter; torchdistill's wrapper is a ``BatchNorm1d`` left in training mode, whose running
statistics are never read)::

    p_s = BN(W avgpool(F_s)),   p_t = BN(avgpool(F_t))
    L_SRD = a * log( sum |p_s - p_t|^e ) + b * KL( softmax(z_t / T) || softmax(z_s / T) )   (KL: batch mean)

(the projector has no bias by default: the normalisation would cancel it) with ``a = 2``, ``b = 1`` (torchdistill's constants, arguments here), e = 4 and T = 1 on ImageNet (ResNet-34 ->
ResNet-18, torchdistill's official run ``configs/official/ilsvrc2012/roymiles/aaai2024``: 71.92)::

    adapters:
      srd_student: {type: srd_projector, inputs: {x: "student:layer4"}, args: {linear: true}}
      srd_teacher: {type: srd_projector, inputs: {x: "teacher:layer4"}, args: {linear: false}}
    losses:
      - {name: ce, type: cross_entropy, weight: 1.0}
      - {name: srd, type: srd, weight: 1.0, args: {exponent: 4.0, temperature: 1.0},
         inputs: {student_feature: "adapter:srd_student", teacher_feature: "adapter:srd_teacher",
                  student: "student:@output", teacher: "teacher:@output"}}
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from ..errors import ShapeError
from .registry import register_adapter, register_loss
from .args import Channels, Flag, MethodArgs, NonNegative, Positive
from .base import Adapter, DistillLoss, Shape, _fmt, channels, require_arg


class SRDProjectorArgs(MethodArgs):
    in_features: Optional[Channels] = Field(None, description="channels of x, 1 to 16384 (default: from the input tap)")
    out_features: Optional[Channels] = Field(
        None, description="output features of the linear projector, 1 to 16384 (default: from match, else in_features)")
    linear: Flag = Field(True, description="true / false: a linear projector before the normalisation "
                                           "(true on the student's side, false on the teacher's)")
    eps: Positive = Field(1e-4, description="BatchNorm's eps, > 0")
    bias: Flag = Field(False, description="true / false: a bias in the linear projector (torchdistill's has one; the "
                                          "normalisation after it cancels it, so it gets no gradient)")


class SRDArgs(MethodArgs):
    exponent: Positive = Field(4.0, description="exponent e of the feature distance, > 0")
    temperature: Positive = Field(1.0, description="softmax temperature T of the KL term, > 0")
    feature_weight: NonNegative = Field(2.0, description="weight a of the log feature term, >= 0 (2 in torchdistill)")
    logit_weight: NonNegative = Field(1.0, description="weight b of the KL term, >= 0 (1 in torchdistill)")


@register_adapter("srd_projector")
class SRDProjector(Adapter):
    """``BN(linear(mean_hw(x)))`` with batch statistics and no affine parameters (``linear: false``: no linear)."""

    Args = SRDProjectorArgs

    def __init__(self, in_features: int, out_features: Optional[int] = None, linear: bool = True, eps: float = 1e-4,
                 bias: bool = False):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        if not linear and out_features != in_features:
            raise ValueError(f"srd_projector without a linear layer keeps its {in_features} features; "
                             f"out_features {out_features} needs linear: true")
        self.linear = nn.Linear(in_features, out_features, bias=bias) if linear else None
        self.eps = float(eps)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def infer_args(cls, args: dict[str, Any], input_shapes: Mapping[str, Shape], match_shape: Shape | None) -> dict[str, Any]:
        args = dict(args)
        require_arg(args, "in_features", channels(input_shapes["x"], "srd_projector input"))
        if match_shape is not None and args.get("linear", True):
            require_arg(args, "out_features", channels(match_shape, "srd_projector match"))
        return args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:
            x = x.flatten(2).mean(dim=2)
        if self.linear is not None:
            x = self.linear(x)
        # batch statistics always (training=True without running buffers): nothing to track, nothing to freeze
        return F.batch_norm(x, None, None, training=True, eps=self.eps)


@register_loss("srd")
class SRDLoss(DistillLoss):
    """``a * log(sum |p_s - p_t|^e) + b * KL(softmax(z_t/T) || softmax(z_s/T))``."""

    inputs = ("student_feature", "teacher_feature", "student", "teacher")
    default_inputs = {"student": "student:@output", "teacher": "teacher:@output"}
    same_shape = (("student_feature", "teacher_feature"), ("student", "teacher"))
    Args = SRDArgs

    def __init__(self, exponent: float = 4.0, temperature: float = 1.0, feature_weight: float = 2.0,
                 logit_weight: float = 1.0):
        super().__init__()
        if exponent <= 0 or temperature <= 0:
            raise ValueError(f"exponent and temperature must be > 0, got {exponent}, {temperature}")
        self.exponent, self.temperature = float(exponent), float(temperature)
        self.feature_weight, self.logit_weight = float(feature_weight), float(logit_weight)

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        super().check_shapes(shapes, taps, where)
        for name in ("student", "teacher"):
            s = shapes.get(name)
            if s is not None and len(s) != 2:
                raise ShapeError(f"{where}: srd's {name!r} input must be B x classes logits, but {taps[name]} has "
                                 f"shape {_fmt(s)}; bind it to '{name}:@output'")

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor, student: torch.Tensor,
                teacher: torch.Tensor) -> torch.Tensor:
        feat = torch.log((student_feature - teacher_feature).abs().pow(self.exponent).sum())
        t = self.temperature
        kl = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                      reduction="batchmean", log_target=True)
        return self.feature_weight * feat + self.logit_weight * kl
