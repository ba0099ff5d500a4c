"""CTKD: curriculum temperature for knowledge distillation (a learnable temperature, trained adversarially).

Z. Li, X. Li, L. Yang, B. Zhao, R. Song, L. Luo, J. Li, J. Yang, "Curriculum Temperature for Knowledge
Distillation", AAAI 2023, https://arxiv.org/abs/2211.16231 (code: zhengli97/CTKD, ``models/temp_global.py``)

A global temperature ``T = t_start + t_end * sigmoid(theta)`` (``theta`` learnable, initialised to 1) feeds the KD
(or DKD) term. The student minimises the distillation loss; ``theta`` *maximises* it through a gradient reversal
layer whose strength ``lambda`` grows along a curriculum (cosine, 0 -> 1 over the first epochs)::

    forward:  T = t_start + t_end * sigmoid(GRL(theta))          backward:  dL/dtheta  <-  -lambda * dL/dtheta

In kdgraph ``ctkd`` is an adapter that outputs ``T``; ``kd`` and ``dkd`` read it through their optional
``temperature`` input, the adapter trains with the stage (its parameter is checkpointed and resumed with the
adapters), and ``grl_lambda`` follows a schedule (a general mechanism, see docs/schedules.md). ImageNet
(zhengli97/CTKD ``scripts/run_imagenet_distill.sh``: t_start 1, t_end 20, cosine 0 -> 1 over 5 epochs, counted
from 1 in the code)::

    adapters:
      ctkd: {type: ctkd, args: {t_start: 1.0, t_end: 20.0,
             grl_lambda: {schedule: cosine, from: 0.0, to: 1.0, epochs: 5, per: epoch, count_from: 1}}}
    stages: [{..., train: [student, ctkd], losses: [
      {name: ce, type: cross_entropy},
      {name: kd, type: kd, inputs: {student: "student:@output", teacher: "teacher:@output",
                                    temperature: "adapter:ctkd"}}]}]

The authors' code writes the curriculum as ``CosineDecay(max 0, min -1)`` multiplying the gradient (so ``-lambda``)
and evaluates it at epochs 1, 2, ... (``count_from: 1``; the paper starts at 0).
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from .registry import register_adapter
from .args import Float, MethodArgs, NonNegative, Positive
from .base import Adapter


class CTKDArgs(MethodArgs):
    t_start: NonNegative = Field(1.0, description="lowest temperature, >= 0 (T = t_start + t_end * sigmoid(theta))")
    t_end: Positive = Field(20.0, description="temperature range above t_start, > 0")
    grl_lambda: NonNegative = Field(1.0, description="gradient reversal strength lambda >= 0 (usually a schedule)")
    init: Float = Field(1.0, description="initial theta (the authors': 1)")


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-lambda`` (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.lambda_ * grad, None


def gradient_reversal(x: torch.Tensor, lambda_: float) -> torch.Tensor:
    return _GradientReversal.apply(x, lambda_)


@register_adapter("ctkd")
class CTKDTemperature(Adapter):
    """A learnable global temperature behind a gradient reversal layer; its inputs only fix where it runs."""

    inputs = ("student", "teacher")
    default_inputs = {"student": "student:@output", "teacher": "teacher:@output"}
    Args = CTKDArgs

    def __init__(self, t_start: float = 1.0, t_end: float = 20.0, grl_lambda: float = 1.0, init: float = 1.0):
        super().__init__()
        self.t_start, self.t_end, self.grl_lambda = float(t_start), float(t_end), float(grl_lambda)
        self.global_T = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        theta = gradient_reversal(self.global_T, self.grl_lambda)
        return (self.t_start + self.t_end * torch.sigmoid(theta)).reshape(())  # a 0-d tensor: terms stay scalars

    def extra_repr(self) -> str:
        return f"t_start={self.t_start}, t_end={self.t_end}, grl_lambda={self.grl_lambda}"
