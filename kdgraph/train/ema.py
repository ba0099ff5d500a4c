"""An exponential moving average of the student (``stages[i].ema``): torch's ``AveragedModel`` with
``get_ema_multi_avg_fn``, weights and floating-point buffers (BatchNorm statistics) averaged:

    ema = decay * ema + (1 - decay) * student        after every ``every`` optimizer steps

The first update copies the student (AveragedModel's convention). Integer buffers (BatchNorm's
``num_batches_tracked``) are copied. With ``report: true`` the EMA is what the trainer evaluates and what a
checkpoint's ``student`` holds (so ``kdgraph eval`` and ``kdgraph export`` use it); its full state is under the
checkpoint's ``ema`` key either way, and ``--resume`` restores it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["StudentEMA"]


def _ema_fn(decay: float):
    """torch's ``get_ema_multi_avg_fn(decay)`` for floating-point tensors (one foreach lerp per device and
    dtype); integer buffers are copied."""
    ema = get_ema_multi_avg_fn(decay)

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: Any) -> None:
        if averaged[0].is_floating_point():
            ema(averaged, current, n)
        else:
            torch._foreach_copy_(averaged, current)

    return update


class StudentEMA:
    """The EMA of ``student`` with the spec's decay and update interval."""

    def __init__(self, student: nn.Module, spec: Any):
        self.spec = spec
        self.model = AveragedModel(student, multi_avg_fn=_ema_fn(spec.decay), use_buffers=True)
        self.model.eval()
        self.steps = 0  # optimizer steps seen

    @property
    def module(self) -> nn.Module:
        """The averaged student (a copy of the student's class)."""
        return self.model.module

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """After an optimizer step: average every ``every`` steps."""
        self.steps += 1
        if self.steps % self.spec.every == 0:
            self.model.update_parameters(student)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.steps = int(state["steps"])
