"""DAB: distillation of activation boundaries (alternative activation transfer loss), two stages.

B. Heo, M. Lee, S. Yun, J. Y. Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden
Neurons", AAAI 2019, https://ojs.aaai.org/index.php/AAAI/article/view/4264

A connector (1x1 conv + BN, kdgraph's ``connector`` adapter) maps a student map to the teacher's width; the loss
asks every connector neuron to be active exactly where the teacher's neuron is, with margin m::

    L_DAB = 1/B * sum [ (s + m)^2 * 1(s > -m and t <= 0)  +  (s - m)^2 * 1(s <= m and t > 0) ]

(the sum runs over every element; ``reduction: sum`` drops the 1/B), a piecewise-differentiable surrogate of the
activation transfer loss (paper, eq. 5). torchdistill 1.1.5's ``AltActTransferLoss`` sums the four pairs; kdgraph
has one term per pair, whose sum is the same.

Stage 1 of the ImageNet configuration (1 epoch, SGD lr 1e-4) trains the student and the four connectors on the
four stage outputs; stage 2 (19 epochs) trains the student with cross-entropy (torchdistill's KDLoss with alpha 1)::

    adapters:
      connector1: {type: connector, inputs: {x: "student:layer1"}, match: "teacher:layer1",
                   args: {kernel_size: 1, bias: false, bn: true}}
    losses:
      - {name: dab_layer1, type: dab, args: {margin: 1.0},
         inputs: {student: "adapter:connector1", teacher: "teacher:layer1"}}
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .registry import register_loss
from .args import MethodArgs, NonNegative
from .base import DistillLoss, check_reduction


class DABArgs(MethodArgs):
    margin: NonNegative = Field(1.0, description="the margin m, >= 0")
    reduction: Literal["mean", "sum"] = Field("mean", description="'mean' (the sum divided by the batch size) or "
                                                                  "'sum'")


@register_loss("dab")
class AltActTransferLoss(DistillLoss):
    """Alternative activation transfer loss of one connector output and one teacher map."""

    inputs = ("student", "teacher")
    same_shape = (("student", "teacher"),)
    Args = DABArgs

    def __init__(self, margin: float = 1.0, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        self.margin, self.reduction = float(margin), reduction

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        m = self.margin
        active = teacher > 0
        loss = torch.where(active, (student - m).square() * (student <= m),
                           (student + m).square() * (student > -m)).sum()
        return loss / student.shape[0] if self.reduction == "mean" else loss
