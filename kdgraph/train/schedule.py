"""The lr schedule of a stage, as one ``torch.optim.lr_scheduler`` object whose state goes in checkpoints.

Today's per-epoch schedules without warm-up stay torch's own (``MultiStepLR``, ``CosineAnnealingLR``, none for
constant). Every other schedule is one ``LambdaLR`` over :func:`lr_factor`, the reference formula (the same as
transformers' ``get_{linear,cosine,polynomial_decay}_schedule_with_warmup`` with a floor, and timm's /
DIST's step decay), counted in optimizer steps (``interval: step``) or epochs::

    t < W:   warmup_lr/lr + (1 - warmup_lr/lr) * t / W
    t >= W:  floor + (1 - floor) * g(p),  p = min(1, (t - W) / (T - W)),  floor = min_lr / lr
             linear g = 1 - p; cosine g = (1 + cos(pi p)) / 2; polynomial g = (1 - p)^power; constant g = 1
    step:    max(floor, gamma^floor((t - W) / step_size));  multistep: max(floor, gamma^(milestones <= t))

``T`` is the stage's epochs x optimizer steps per epoch (or its epochs), so a linear decay reaches 0 after the
last step. The factor multiplies each parameter group's own lr (lr multipliers, layer decay).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from ..errors import SpecError

__all__ = ["build_scheduler", "lr_factor", "schedule_units"]


def schedule_units(stage: Any, steps_per_epoch: int) -> int:
    """Scheduler steps per epoch: optimizer steps (``interval: step``) or 1."""
    s = stage.scheduler
    if s is None or s.interval == "epoch":
        return 1
    return optimizer_steps_per_epoch(stage, steps_per_epoch)


def optimizer_steps_per_epoch(stage: Any, steps_per_epoch: int) -> int:
    """Optimizer steps in an epoch of ``steps_per_epoch`` micro-batches (the last group may be partial)."""
    k = getattr(stage, "accumulate", 1)
    return -(-steps_per_epoch // k)


def lr_factor(s: Any, lr: float, total: int, per_epoch: int) -> Callable[[int], float]:
    """The reference formula as a function of the scheduler step ``t`` (see the module docstring)."""
    warm = s.warmup_steps or int(round(s.warmup_epochs * per_epoch))
    start, floor = s.warmup_lr / lr, s.min_lr / lr
    span = max(1, total - warm)
    milestones = sorted(m * per_epoch for m in s.milestones)
    step_size = (s.step_size or 1.0) * per_epoch

    def factor(t: int) -> float:
        if t < warm:
            return start + (1.0 - start) * t / warm
        if s.type == "step":
            return max(floor, s.gamma ** math.floor((t - warm) / step_size))
        if s.type == "multistep":
            return max(floor, s.gamma ** sum(1 for m in milestones if m <= t))
        p = min(1.0, (t - warm) / span)
        g = {"linear": lambda: 1.0 - p, "cosine": lambda: 0.5 * (1.0 + math.cos(math.pi * p)),
             "polynomial": lambda: (1.0 - p) ** s.power, "constant": lambda: 1.0}[s.type]()
        return floor + (1.0 - floor) * g

    return factor


def build_scheduler(stage: Any, opt: torch.optim.Optimizer, steps_per_epoch: int = 1) -> Optional[Any]:
    """The stage's scheduler (None for a constant lr). ``steps_per_epoch``: micro-batches per epoch on one
    process; ``interval: step`` schedules are counted in optimizer steps."""
    s = stage.scheduler
    if s is None or (s.is_plain() and s.type == "constant"):
        return None
    if s.is_plain() and s.type == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(s.milestones), gamma=s.gamma)
    if s.is_plain() and s.type == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=stage.epochs)
    per_epoch = schedule_units(stage, steps_per_epoch)
    total = stage.epochs * per_epoch
    warm = s.warmup_steps or int(round(s.warmup_epochs * per_epoch))
    if warm >= total:
        raise SpecError(f"stages.{stage.name}.scheduler: the warm-up ({warm} {s.interval}s) is not shorter than the "
                        f"stage ({stage.epochs} epoch(s) x {per_epoch} {s.interval}(s) = {total}); shorten "
                        f"warmup_steps / warmup_epochs")
    if s.min_lr > stage.optimizer.lr or s.warmup_lr > stage.optimizer.lr:
        raise SpecError(f"stages.{stage.name}.scheduler: min_lr ({s.min_lr:g}) and warmup_lr ({s.warmup_lr:g}) must "
                        f"not exceed optimizer.lr ({stage.optimizer.lr:g})")
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(s, stage.optimizer.lr, total, per_epoch))
