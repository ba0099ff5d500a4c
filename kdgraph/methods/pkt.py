"""PKT: probabilistic knowledge transfer (match the distributions of pairwise cosine similarities).

N. Passalis, A. Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018,
https://arxiv.org/abs/1803.10837 (torchdistill 1.1.5: ``PKTLoss``, refactored from the authors' code)

Each network's embeddings (B x D, flattened from dim 1) are L2-normalised; their cosine similarities, mapped to
[0, 1] by ``(K + 1) / 2``, are normalised per row into conditional probabilities ``P`` (B x B); the loss is the
KL divergence, averaged over all B^2 entries::

    L_PKT = 1/B^2 * sum_ij P_t[i, j] * log( (P_t[i, j] + eps) / (P_s[i, j] + eps) )

Student and teacher may have different widths (only B x B matrices are compared). ImageNet: torchdistill's
``configs/sample/ilsvrc2012/pkt`` taps the input of ``fc`` (the average-pooled 512-d / 2048-d features) with weight
30,000 and *no* label term; its teacher there is ResNet-152. kdgraph's spec uses the table's ResNet-34 and adds the
cross-entropy term, as PKT alone never reaches the student's classifier (``fc`` would keep its random weights)::

    - {name: ce, type: cross_entropy, weight: 1.0}
    - {name: pkt, type: pkt, weight: 30000.0, args: {eps: 1.0e-7},
       inputs: {student: "student:avgpool", teacher: "teacher:avgpool"}}
"""
from __future__ import annotations

from typing import Mapping

import torch
from pydantic import Field

from ..errors import ShapeError
from .registry import register_loss
from .args import MethodArgs, Positive
from .base import DistillLoss, Shape, _fmt


class PKTArgs(MethodArgs):
    eps: Positive = Field(1e-7, description="guard of the norms and the logarithm, > 0")


def _cosine_probabilities(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)  # torchdistill / the authors zero NaNs here
    k = (x @ x.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


@register_loss("pkt")
class PKTLoss(DistillLoss):
    """KL divergence of the row-normalised cosine-similarity matrices, averaged over the B x B entries."""

    inputs = ("student", "teacher")
    Args = PKTArgs

    def __init__(self, eps: float = 1e-7):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        s, t = shapes.get("student"), shapes.get("teacher")
        if s is not None and t is not None and s[0] != t[0]:
            raise ShapeError(f"{where}: pkt compares samples pairwise: {taps['student']} (shape {_fmt(s)}) and "
                             f"{taps['teacher']} (shape {_fmt(t)}) must have the same batch size")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        p_s = _cosine_probabilities(student.flatten(1), self.eps)
        p_t = _cosine_probabilities(teacher.flatten(1), self.eps)
        return torch.mean(p_t * torch.log((p_t + self.eps) / (p_s + self.eps)))
