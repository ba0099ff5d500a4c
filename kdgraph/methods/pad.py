"""PAD-L2: prime-aware adaptive distillation with an L2 (feature regression) loss.

Y. Zhang, Z. Lan, Y. Dai, F. Zeng, Y. Bai, J. Chang, Y. Wei, "Prime-Aware Adaptive
Distillation", ECCV 2020, https://arxiv.org/abs/2008.01458

A variance branch on the student's (flattened) embedding predicts a per-dimension log-variance
``v = BN(W s + b)``; each squared error is scaled by the inverse predicted variance, with ``v``
itself as a penalty (the negative log-likelihood of a Gaussian up to constants)::

    L_PAD = 1/B * sum_i  1/D * sum_d  [ (t_id - s_id)^2 / (eps + exp(v_id)) + v_id ]      eps = 1e-6

(per-sample mean over the D features, then the mean over the batch; ``reduction: sum`` sums the
per-sample means instead). Samples the branch deems hard get a large variance and a small weight,
"prime" samples a large one.

PAD starts from the student of the L2 baseline (``CE + 15 * mse(avgpool)``) and trains 30 more
epochs at lr 0.002 with ``CE + pad_l2``; the variance branch trains with the student. As one
two-stage spec (``specs/pad_l2_resnet18.yaml``) or, from an existing L2 checkpoint, with
``init_from`` (``specs/pad_from_l2_checkpoint.yaml``)::

    adapters:
      variance: {type: pad_variance, inputs: {x: "student:avgpool"}}      # Linear(512,512) -> BN1d(512)
    stages:
      - name: pad
        train: [student, variance]
        losses:
          - {name: ce, type: cross_entropy, weight: 1.0}
          - {name: pad_l2, type: pad_l2, weight: 1.0,
             inputs: {student: "student:avgpool", teacher: "teacher:avgpool",
                      log_variance: "adapter:variance"}}

The adapter's parameters are named like torchdistill's ``VarianceBranch4PAD.var_estimator``
(``0.weight``, ``0.bias``, ``1.weight``, ... ), so its checkpoints load as they are.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, Optional

import torch
from pydantic import Field
from torch import nn

from ..errors import ShapeError
from .registry import register_adapter, register_loss
from .args import Features, MethodArgs, NonNegative
from .base import Adapter, DistillLoss, Shape, _fmt, flat_features, require_arg, check_reduction


class PADVarianceArgs(MethodArgs):
    in_features: Optional[Features] = Field(None, description="input features, >= 1 (default: the input tap, flattened)")
    out_features: Optional[Features] = Field(None, description="output features, >= 1 (default: match, or in_features)")


class PADL2Args(MethodArgs):
    eps: NonNegative = Field(1e-6, description="added to exp(log variance), >= 0")
    reduction: Literal["mean", "sum"] = Field("mean", description="'mean' or 'sum' over the batch")


@register_adapter("pad_variance")
class PADVarianceBranch(Adapter, nn.Sequential):
    """Log-variance branch of PAD: ``x.flatten(1) -> Linear(in, out) -> BatchNorm1d(out)``.

    ``in_features`` follows from the input tap (flattened), ``out_features`` from the ``match``
    tap when given, else it equals ``in_features`` (the student and teacher embeddings of the
    benchmark are both 512-d).
    """

    inputs = ("x",)
    Args = PADVarianceArgs

    def __init__(self, in_features: int, out_features: int | None = None):
        out_features = in_features if out_features is None else out_features
        nn.Sequential.__init__(self, nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features))
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def infer_args(cls, args: dict[str, Any], input_shapes: Mapping[str, Shape], match_shape: Shape | None) -> dict[str, Any]:
        args = dict(args)
        require_arg(args, "in_features", flat_features(input_shapes["x"]))
        if match_shape is not None:
            require_arg(args, "out_features", flat_features(match_shape))
        return args

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.flatten(1)
        for module in self:
            x = module(x)
        return x


@register_loss("pad_l2")
class PADL2Loss(DistillLoss):
    """``mean_i mean_d [ (t - s)^2 / (eps + exp(v)) + v ]`` over flattened embeddings.

    ``student`` and ``teacher`` are the two embeddings (flattened from dim 1), ``log_variance``
    the output of a :class:`PADVarianceBranch` on the student embedding. All three must have the
    same number of features.
    """

    inputs = ("student", "teacher", "log_variance")
    Args = PADL2Args

    def __init__(self, eps: float = 1e-6, reduction: Literal["mean", "sum"] = "mean"):
        super().__init__()
        check_reduction(reduction)
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = float(eps)
        self.reduction = reduction

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        known = [(n, shapes.get(n)) for n in cls.inputs if shapes.get(n) is not None]
        for (n0, s0), (n1, s1) in zip(known, known[1:]):
            if s0[0] != s1[0] or flat_features(s0) != flat_features(s1):
                raise ShapeError(
                    f"{where}: pad_l2 compares flattened features element-wise, but {n0!r} ({taps[n0]}, shape "
                    f"{_fmt(s0)}) and {n1!r} ({taps[n1]}, shape {_fmt(s1)}) differ in batch size or number of "
                    f"features. Tap embeddings of equal size (e.g. both avgpool outputs) and give the "
                    f"pad_variance adapter the student embedding as input.")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
        s = student.flatten(1)
        t = teacher.flatten(1)
        v = log_variance.flatten(1)
        per_sample = ((t - s).pow(2) / (self.eps + torch.exp(v)) + v).mean(dim=1)
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()
