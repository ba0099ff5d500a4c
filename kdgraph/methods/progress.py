"""The stage's progress: the one context through which losses see how far training is.

A :class:`Progress` belongs to a :class:`~kdgraph.Distiller` (``d.progress``). kdgraph's trainer updates it
before every optimizer step; a user's own loop does the same::

    for epoch in range(epochs):
        for step, (x, y) in enumerate(loader):
            d.progress.update(epoch=epoch, step=step, steps_per_epoch=len(loader), epochs=epochs)
            out = d(x, y)

Scheduled loss weights and scheduled loss arguments (:mod:`kdgraph.spec.schedule`) read it, and so may a
user's loss (``kdgraph.methods.progress.Progress`` is handed to nothing implicitly: a loss that needs it declares a
schedule in the spec). Because every value derived from it is a pure function of (epoch, step), a resumed run
that restores its position restores every schedule. Until the first update it reads epoch 0, step 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..spec.schedule import Schedule

__all__ = ["Progress", "ScheduledValue", "ScheduledArg"]


@dataclass
class Progress:
    """Where the current stage is: ``epoch`` and ``step`` (within the epoch) both 0-based."""

    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    epochs: int = 0

    def update(self, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> None:
        self.epoch, self.step, self.steps_per_epoch, self.epochs = int(epoch), int(step), int(steps_per_epoch), int(epochs)

    @property
    def epochs_done(self) -> float:
        """``epoch + step / steps_per_epoch``: the stage's position in (fractional) epochs."""
        return self.epoch + (self.step / self.steps_per_epoch if self.steps_per_epoch else 0.0)

    @property
    def fraction(self) -> float:
        """Share of the stage done, in [0, 1] (0 until ``epochs`` is known)."""
        return min(self.epochs_done / self.epochs, 1.0) if self.epochs else 0.0

    def value(self, schedule: Schedule) -> float:
        return schedule.value(self.epoch, self.step, self.steps_per_epoch)


class ScheduledValue(nn.Module):
    """A loss weight that follows a schedule: the fused graph multiplies the term by ``self()``."""

    def __init__(self, schedule: Schedule, progress: Progress):
        super().__init__()
        self.schedule, self.progress = schedule, progress

    def forward(self) -> float:
        return self.progress.value(self.schedule)

    def extra_repr(self) -> str:
        return self.schedule.describe()


class ScheduledArg:
    """A forward pre-hook that sets a loss's numeric attribute ``name`` from its schedule before each call."""

    def __init__(self, name: str, schedule: Schedule, progress: Progress):
        self.name, self.schedule, self.progress = name, schedule, progress

    def __call__(self, module: nn.Module, args: Any) -> None:
        setattr(module, self.name, self.progress.value(self.schedule))
