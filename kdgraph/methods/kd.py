"""KD: knowledge distillation with softened logits.

G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014
Deep Learning Workshop, https://arxiv.org/abs/1503.02531

    L_KD = T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )      (KL averaged over the batch)

The reference objective ``alpha * CE + (1 - alpha) * L_KD`` is two terms in the spec, so each
shows up in ``out.terms`` (alpha = 0.5, T = 1.0 for ImageNet; Tf-KD uses alpha = 0.9). ``t_squared: false``
drops the T^2 factor: the softened KL alone, what torchdistill's ``KDLoss`` returns when called with
``targets=None`` (its GLUE study, specs/glue/)::

    losses:
      - {name: ce, type: cross_entropy, weight: 0.5}
      - {name: kd, type: kd, weight: 0.5, args: {temperature: 1.0},
         inputs: {student: "student:@output", teacher: "teacher:@output"}}
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from pydantic import Field

from .registry import register_loss
from .args import Flag, MethodArgs, Positive
from .base import DistillLoss


class KDArgs(MethodArgs):
    temperature: Positive = Field(1.0, description="softening temperature T, > 0")
    t_squared: Flag = Field(True, description="multiply the KL by T^2 (Hinton's gradient scaling); false: the "
                                              "softened KL alone, as torchdistill's KDLoss with targets=None")


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float | torch.Tensor,
                  t_squared: bool = True) -> torch.Tensor:
    """``T^2 * KL(p_t || p_s)`` with batchmean reduction (shared by KD, Tf-KD and SSKD); the KL alone without
    ``t_squared``. ``temperature`` may be a tensor (CTKD's learnable temperature)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * (temperature ** 2) if t_squared else kl


@register_loss("kd")
class KDLoss(DistillLoss):
    """Soft-target term of Hinton et al.: ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``."""

    inputs = ("student", "teacher", "temperature")
    default_inputs = {"student": "student:@output", "teacher": "teacher:@output"}
    same_shape = (("student", "teacher"),)
    Args = KDArgs

    def __init__(self, temperature: float = 1.0, t_squared: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.t_squared = bool(t_squared)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                temperature: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``temperature``: an optional tensor tap (CTKD's learnable ``adapter:ctkd``) overriding the argument."""
        return kd_divergence(student, teacher, self.temperature if temperature is None else temperature,
                             self.t_squared)
