"""Optimizers and learning-rate schedules of a stage, and the learning rate actually used.

``lr_used = optimizer.lr * world_size / reference_world_size``: linear scaling by the number of processes,
relative to the number the spec's lr was tuned for; the effective batch is ``batch_size * world_size``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..errors import TrainingError
from ..spec import StageSpec

__all__ = ["lr_used", "build_optimizer", "build_scheduler"]


def lr_used(stage: StageSpec | Any, world_size: int) -> float:
    """The explicit scaling rule: ``lr * world_size / reference_world_size``."""
    return stage.optimizer.lr * world_size / stage.reference_world_size


def build_optimizer(stage: StageSpec | Any, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The stage's optimizer (sgd, adam, adamw) over ``params`` at learning rate ``lr``."""
    o = stage.optimizer
    if not params:
        raise TrainingError(f"stage {stage.name!r}: nothing to optimise (no trainable parameter); check its `train` list")
    if o.type == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
    if o.type == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=o.weight_decay)
    if o.type == "sgd_dot":  # kdgraph.train.dot: two momenta, stepped with the terms (StepLoop)
        from .dot import DOT

        return DOT(params, lr=lr, momentum=o.momentum, delta=o.delta, weight_decay=o.weight_decay)
    if o.type == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)
    raise TrainingError(f"unknown optimizer type {o.type!r}")  # pragma: no cover - the schema forbids it


def build_scheduler(stage: StageSpec | Any, opt: torch.optim.Optimizer) -> Optional[Any]:
    """Stepped once per epoch: multistep (milestones in epochs), cosine (over the stage's epochs), constant."""
    s = stage.scheduler
    if s is None or s.type == "constant":
        return None
    if s.type == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(s.milestones), gamma=s.gamma)
    if s.type == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=stage.epochs)
    raise TrainingError(f"unknown scheduler type {s.type!r}")  # pragma: no cover
