"""SSKD: knowledge distillation meets self-supervision, two stages.

G. Xu, Z. Liu, X. Li, C. C. Loy, "Knowledge Distillation Meets Self-Supervision", ECCV 2020,
https://arxiv.org/abs/2006.07114 (reference code: github.com/xuguodong03/SSKD)

Every image is seen four times, rotated by 0, 90, 180 and 270 degrees (transform
``sskd_rotations``). A self-supervision head on each network's flattened avgpool,
``Linear(C, C) -> ReLU -> Linear(C, C)`` (adapter ``sskd_head``), embeds every view. For a batch
of B images, ``cos`` is the 3B x B matrix of cosine similarities between each rotated view's
embedding and each normal view's embedding; the "label" of a rotated view is its source image.

Stage 1 (teacher frozen, only its head trains), loss ``aux_sskd``::

    L_aux = CE(cos_t, source image)

Stage 2 (teacher and its head frozen; student and its head train), four terms::

    L = 1.0 * CE(z_s[normal], y)                                   cross_entropy (first B rows)
      + 0.9 * T^2 KL(softmax(z_t[normal]/T) || softmax(z_s[normal]/T)),  T = 4    sskd_kd
      + 10  * T^2 KL(softmax(cos_t[S_ss]/T) || softmax(cos_s[S_ss]/T)),  T = 0.5  sskd_ss
      + 2.7 * T^2 KL(softmax(z_t[rot][S_tf]/T) || softmax(z_s[rot][S_tf]/T)), T = 4  sskd_tf

``S`` keeps the rotated views the teacher gets right (the true class / source image ranks
first) plus the best-ranked ``ratio`` of the wrong ones (ratio 0.75 for ss, 1.0 for tf); KL is
averaged over the kept rows. Each rule follows torchdistill 1.1.5's ``SSKDLoss`` exactly
(including its tie order), so the four weighted terms sum to its value.

Row layout: ``sskd_rotations`` turns B x C x H x W into 4B rows stacked *by rotation*: rows
``r*B .. r*B+B-1`` are the B images rotated by ``r * 90`` degrees counter-clockwise (``r = 0``
first, so the first B rows are the untouched batch, which is what ``cross_entropy`` scores and
what a trainer reads as the logits of the batch). torchdistill stacks the views *by image*
(row ``4i + r``); the losses here reorder the rotated rows to that order before ranking, so they
select exactly the rows torchdistill selects. ImageNet reference (torchdistill 1.1.5, 70.09)::

    adapters:
      teacher_ss: {type: sskd_head, inputs: {x: "teacher:avgpool"}}
      student_ss: {type: sskd_head, inputs: {x: "student:avgpool"}}
    stages:
      - name: teacher_ss
        train: [teacher_ss]
        transform: {type: sskd_rotations}
        losses:
          - {name: aux, type: aux_sskd, inputs: {embedding: "adapter:teacher_ss"}}
      - name: distill
        train: [student, student_ss]
        transform: {type: sskd_rotations}
        losses:
          - {name: ce, type: cross_entropy, weight: 1.0}
          - {name: kd, type: sskd_kd, weight: 0.9, args: {temperature: 4.0}}
          - {name: ss, type: sskd_ss, weight: 10.0, args: {temperature: 0.5, ratio: 0.75},
             inputs: {student: "adapter:student_ss", teacher: "adapter:teacher_ss"}}
          - {name: tf, type: sskd_tf, weight: 2.7, args: {temperature: 4.0, ratio: 1.0}}
"""
from __future__ import annotations


from typing import Optional

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from ..errors import ShapeError
from .registry import register_adapter, register_loss, register_transform
from .args import Features, Fraction, MethodArgs, NoArgs, Positive
from .base import DistillLoss, FlatInputAdapter, InputTransform


class SSKDHeadArgs(MethodArgs):
    in_features: Optional[Features] = Field(None, description="input features, >= 1 (default: the input tap, flattened)")
    hidden_features: Optional[Features] = Field(None, description="hidden features, >= 1 (default: in_features)")
    out_features: Optional[Features] = Field(None, description="output features, >= 1 (default: in_features)")


class SSKDTemperatureArgs(MethodArgs):
    temperature: Positive = Field(4.0, description="softening temperature, > 0")


class SSKDRankedArgs(MethodArgs):
    temperature: Positive = Field(0.5, description="softening temperature, > 0")
    ratio: Fraction = Field(0.75, description="share of the wrongly ranked rows kept, in [0, 1]")


class SSKDTFArgs(SSKDRankedArgs):
    temperature: Positive = Field(4.0, description="softening temperature, > 0")
    ratio: Fraction = Field(1.0, description="share of the wrongly ranked rows kept, in [0, 1]")

NUM_VIEWS = 4


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


@register_transform("sskd_rotations")
class SSKDRotations(InputTransform):
    """B x C x H x W -> 4B x C x H x W: ``[x, rot90(x), rot180(x), rot270(x)]`` stacked by rotation.

    Rotations are counter-clockwise, as PIL's ``Image.rotate(90 * r)`` that torchdistill applies
    (there each view gets its own random crop; here the four views share the batch's crop).
    Images must be square.
    """

    Args = NoArgs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
            raise ShapeError(f"sskd_rotations: expected square images B x C x H x H, got shape "
                             f"{list(images.shape)}; set input.size to a square size")
        return torch.cat([torch.rot90(images, r, dims=(2, 3)) for r in range(NUM_VIEWS)], 0)


def split_views(x: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``sskd_rotations`` -> (normal views, B x ...; rotated views, 3B x ... ordered by
    image then rotation: image 0 at 90/180/270, image 1 at 90/180/270, ... as torchdistill)."""
    rows = x.shape[0]
    if rows % NUM_VIEWS:
        raise ShapeError(f"{what}: expected 4B rows (the 4 rotated views of B images, transform "
                         f"sskd_rotations), got {rows} rows; add `transform: {{type: sskd_rotations}}` "
                         f"to the stage")
    b = rows // NUM_VIEWS
    rest = x.shape[1:]
    rotated = x[b:].reshape(NUM_VIEWS - 1, b, *rest).transpose(0, 1).reshape((NUM_VIEWS - 1) * b, *rest)
    return x[:b], rotated


def view_similarities(embedding: torch.Tensor, what: str) -> torch.Tensor:
    """3B x B cosine similarities of each rotated view's embedding to each normal view's.

    Broadcast ``F.cosine_similarity`` (3B x D x B), not a matmul of normalised rows: it rounds
    exactly as torchdistill does, and the ss term (a KL between nearly equal distributions early
    on) and its rank-based selection are sensitive to the last bit.
    """
    normal, rotated = split_views(embedding.flatten(1), what)
    return F.cosine_similarity(rotated.unsqueeze(2), normal.t().unsqueeze(0), dim=1)


def keep_ranked(scores: torch.Tensor, labels: torch.Tensor, ratio: float) -> torch.Tensor:
    """Rows (sorted) whose label ranks first in ``scores`` plus the best-ranked ``int(ratio * wrong)``
    of the others; torchdistill's rule, tie order included."""
    order = torch.argsort(scores, dim=1, descending=True)
    rank = torch.argmax(torch.eq(order, labels.unsqueeze(1)).long(), dim=1)
    by_rank = torch.argsort(rank)
    wrong = int(torch.count_nonzero(rank))
    keep = scores.shape[0] - wrong + int(wrong * ratio)
    return torch.sort(by_rank[:keep])[0]


def _soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))``, batchmean over the rows given (teacher detached)."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    log_p_s = F.log_softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher.detach() / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature ** 2


def _check_temperature(temperature: float) -> float:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def _check_ratio(ratio: float) -> float:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return float(ratio)


# --------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------


@register_adapter("sskd_head")
class SSKDHead(FlatInputAdapter, nn.Sequential):
    """flatten -> Linear(in, hidden) -> ReLU -> Linear(hidden, out); hidden = out = in by default.

    The state_dict keys (``0.weight`` ... ``2.bias``) are those of torchdistill's ``ss_module``.
    """

    inputs = ("x",)
    Args = SSKDHeadArgs

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None):
        hidden = hidden_features or in_features
        nn.Sequential.__init__(self, nn.Linear(in_features, hidden), nn.ReLU(),
                               nn.Linear(hidden, out_features or in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Sequential.forward(self, torch.flatten(x, 1))


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


@register_loss("aux_sskd")
class AuxSSKDLoss(DistillLoss):
    """Stage 1: ``CE(cos(rotated view, every normal view), its source image)`` on one network's head."""

    inputs = ("embedding",)
    Args = NoArgs

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        cos = view_similarities(embedding, "aux_sskd")
        b = cos.shape[1]
        source = torch.arange(b, device=cos.device).repeat_interleave(NUM_VIEWS - 1)
        return F.cross_entropy(cos, source)


@register_loss("sskd_kd")
class SSKDKDLoss(DistillLoss):
    """``T^2 KL(softmax(z_t/T) || softmax(z_s/T))`` over the normal views (the first B of 4B rows)."""

    inputs = ("student", "teacher")
    default_inputs = {"student": "student:@output", "teacher": "teacher:@output"}
    same_shape = (("student", "teacher"),)
    Args = SSKDTemperatureArgs

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, _ = split_views(student, "sskd_kd")
        t, _ = split_views(teacher, "sskd_kd")
        return _soft_kl(s, t, self.temperature)


@register_loss("sskd_ss")
class SSKDSelfSupervisionLoss(DistillLoss):
    """``T^2 KL`` between the teacher's and the student's similarity matrices (rows: rotated views,
    columns: normal views), on the rows where the teacher's own source image ranks first plus the
    best ``ratio`` of the rest."""

    inputs = ("student", "teacher")
    same_shape = (("student", "teacher"),)
    Args = SSKDRankedArgs

    def __init__(self, temperature: float = 0.5, ratio: float = 0.75):
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.ratio = _check_ratio(ratio)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        cos_s = view_similarities(student, "sskd_ss")
        cos_t = view_similarities(teacher, "sskd_ss").detach()
        source = torch.arange(cos_t.shape[1], device=cos_t.device).repeat_interleave(NUM_VIEWS - 1)
        keep = keep_ranked(cos_t, source, self.ratio)
        return _soft_kl(cos_s[keep], cos_t[keep], self.temperature)


@register_loss("sskd_tf")
class SSKDTransformLoss(DistillLoss):
    """``T^2 KL(softmax(z_t/T) || softmax(z_s/T))`` over the rotated views whose true class the
    teacher ranks first plus the best ``ratio`` of the rest."""

    inputs = ("student", "teacher", "targets")
    default_inputs = {"student": "student:@output", "teacher": "teacher:@output", "targets": "batch:targets"}
    same_shape = (("student", "teacher"),)
    batch_only_inputs = ("targets",)
    Args = SSKDTFArgs

    def __init__(self, temperature: float = 4.0, ratio: float = 1.0):
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.ratio = _check_ratio(ratio)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _, s = split_views(student, "sskd_tf")
        _, t = split_views(teacher.detach(), "sskd_tf")
        if targets.shape[0] * (NUM_VIEWS - 1) != t.shape[0]:
            raise ShapeError(f"sskd_tf: {targets.shape[0]} targets for {student.shape[0]} logits rows; "
                             f"expected 4 rows (rotated views) per target")
        labels = targets.to(t.device).long().repeat_interleave(NUM_VIEWS - 1)
        keep = keep_ranked(F.softmax(t / self.temperature, dim=1), labels, self.ratio)
        return _soft_kl(s[keep], t[keep], self.temperature)
