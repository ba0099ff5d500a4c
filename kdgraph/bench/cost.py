"""Estimated cost of a run, for ``kdgraph bench --dry-run``: training FLOPs from traced forwards.

Per training image of a stage: the teacher's forward (when the stage's graph still runs the teacher)
plus three times the student's forward (forward + backward ~ 3x), times the views an input transform
makes (SSKD's rotations: 4). Adapters, losses and evaluation are left out, so the figure is a lower
bound; it is meant for comparing runs and sizing a GPU allocation, not for billing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..spec import Spec

IMAGENET_TRAIN_IMAGES = 1_281_167
FASHION_MNIST_TRAIN_IMAGES = 60_000


def forward_flops(model: nn.Module, channels: int, size: tuple[int, int], named: Optional[dict] = None) -> int:
    """FLOPs of one forward of one image, or of one example of the spec's ``input.named`` inputs (a causal LM's
    row of tokens: zeros of each input's shape and dtype), by torch's FlopCounterMode (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if named:
            model(**{k: torch.zeros(1, *v.shape, dtype=getattr(torch, v.dtype)) for k, v in named.items()})
        else:
            model(torch.zeros(1, channels, *size))
    model.train(was)
    return int(counter.get_total_flops())


def train_images(spec: Spec, counted: Optional[int] = None) -> int:
    """Training images per epoch: data.train_subset, else the counted or known size of the data set."""
    known = {"imagenet": IMAGENET_TRAIN_IMAGES, "fashion_mnist": FASHION_MNIST_TRAIN_IMAGES,
             "synthetic": 512}.get(spec.data.dataset, 0)
    n = counted if counted is not None else known
    if not n:  # a size not known without reading the data (text rows): the subset, if one is set
        return int(spec.data.train_subset or 0)
    return min(n, spec.data.train_subset) if spec.data.train_subset else n


def estimate(spec: Spec, distiller, images: int, teacher_flops: int, student_flops: int) -> dict:
    """{"stages": [{name, epochs, images, views, uses_teacher, pflop}], "pflop": total}."""
    stages, total = [], 0.0
    c, size = spec.input.channels, tuple(spec.input.size)
    for i, st in enumerate(spec.stages):
        distiller.enter_stage(i)
        rep = distiller.report
        views = 1
        if rep.transform:
            t = distiller.transforms[st.name] if st.name in distiller.transforms else None
            if t is not None:
                try:
                    out = t(torch.zeros(2, c, *size))
                    views = max(1, int((out[0] if isinstance(out, (tuple, list)) else out).shape[0]) // 2)
                except Exception:  # noqa: BLE001 - an estimate; an odd transform counts as one view
                    views = 1
        per_image = (teacher_flops if rep.uses_teacher else 0) + (3 * student_flops if rep.uses_student else 0)
        pflop = per_image * views * images * st.epochs / 1e15
        total += pflop
        stages.append({"name": st.name, "epochs": st.epochs, "images": images, "views": views,
                       "uses_teacher": rep.uses_teacher, "pflop": round(pflop, 4)})
    distiller.enter_stage(0)
    return {"stages": stages, "pflop": round(total, 4)}
