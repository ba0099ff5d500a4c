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


class StudentEMA:
    """The EMA of ``student`` with the spec's decay and update interval."""

    def __init__(self, student: nn.Module, spec: Any):
        self.spec = spec
        self.model = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(spec.decay), use_buffers=False)
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
        if self.steps % self.spec.every:
            return
        before = [b.clone() if b.is_floating_point() else None for b in self.module.buffers()]
        first = int(self.model.n_averaged) == 0
        self.model.update_parameters(student)  # averages the parameters, copies the buffers (use_buffers=False)
        if not first:
            for mine, old in zip(self.module.buffers(), before):
                if old is not None:
                    mine.copy_(old.lerp_(mine, 1.0 - self.spec.decay))

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.steps = int(state["steps"])
