"""Regression task loss: mean squared error between the student's score and a real-valued label (GLUE STS-B).

    L_reg = 1/B * sum_i (s_i - y_i)^2        s = the student's B x 1 output, squeezed; y = float labels

It is the loss a Hugging Face sequence classifier with ``num_labels = 1`` computes itself
(``MSELoss()(logits.squeeze(), labels.squeeze())``), which torchdistill's STS-B distillation config keeps as its
``model_term`` (weight 1.0; Matsubara, "torchdistill Meets Hugging Face Libraries for Reproducible, Coding-Free
Deep Learning Studies: A Case Study on NLP", NLP-OSS 2023)::

    - {name: task, type: regression_mse, inputs: {predictions: "student:classifier", targets: "batch:targets"}}
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch.nn import functional as F

from ..errors import ShapeError
from .registry import register_loss
from .args import NoArgs
from .base import DistillLoss, Shape, _fmt


@register_loss("regression_mse")
class RegressionMSE(DistillLoss):
    """``F.mse_loss(predictions.squeeze(), targets.squeeze().float())``: a B x 1 (or B) score against labels."""

    inputs = ("predictions", "targets")
    default_inputs = {"predictions": "student:@output", "targets": "batch:targets"}
    batch_only_inputs = ("targets",)
    Args = NoArgs
    task_term = True

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        s = shapes.get("predictions")
        if s is not None and not (len(s) == 1 or (len(s) == 2 and s[1] == 1)):
            raise ShapeError(f"{where}: regression_mse scores one value per example (B or B x 1), but input "
                             f"'predictions' ({taps.get('predictions')}) has shape {_fmt(s)}; a regression head "
                             f"has one output (num_labels: 1)")

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(predictions.squeeze(), targets.squeeze().to(predictions.dtype))
