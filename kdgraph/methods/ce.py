"""Cross-entropy with the labels: the hard-label term every method in the benchmark keeps.

    L_CE = -1/B * sum_i log softmax(z_s)_i[y_i]

Spec::

    - {name: ce, type: cross_entropy, weight: 1.0}   # inputs default to student logits and targets
"""
from __future__ import annotations

from typing import Mapping

import torch
from pydantic import Field
from torch.nn import functional as F

from ..errors import ShapeError
from .registry import register_loss
from .args import Fraction, MethodArgs
from .base import DistillLoss, Shape, _fmt


class CrossEntropyArgs(MethodArgs):
    label_smoothing: Fraction = Field(0.0, description="in [0, 1], as in torch.nn.functional.cross_entropy")


@register_loss("cross_entropy")
class CrossEntropy(DistillLoss):
    """``F.cross_entropy(logits, targets)``; ``label_smoothing`` as in PyTorch. ``targets``: class indices, or
    soft targets (float B x num_classes probabilities, from data.augment's mixup / cutmix), as F.cross_entropy takes.

    When the logits have more rows than there are targets (an input transform such as SSKD's
    rotations made several views per image), only the first ``len(targets)`` rows, the original
    images, are scored.
    """

    inputs = ("logits", "targets")
    default_inputs = {"logits": "student:@output", "targets": "batch:targets"}
    batch_only_inputs = ("targets",)
    soft_target_inputs = ("targets",)  # class indices, or B x K probabilities (mixup / cutmix)
    Args = CrossEntropyArgs
    task_term = True

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        s = shapes.get("logits")
        if s is not None and len(s) != 2:
            raise ShapeError(f"{where}: cross_entropy scores class logits B x num_classes, but input 'logits' "
                             f"({taps.get('logits')}) has shape {_fmt(s)}; tap the network's output (@output)")

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] != targets.shape[0]:
            logits = logits[: targets.shape[0]]
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
