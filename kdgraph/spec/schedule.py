"""Schedules of loss weights and loss arguments: the spec's ``{schedule: ...}`` form and its value over training.

Wherever a loss's ``weight`` or one of its numeric ``args`` may be a number, it may instead be a schedule::

    weight: {schedule: linear_warmup, epochs: 20, to: 8.0}          # 0 -> 8 over the first 20 epochs, then 8
    args: {temperature: {schedule: cosine, from: 4.0, to: 1.0, epochs: 100}}

The value is a pure function of the stage's progress (:class:`kdgraph.methods.progress.Progress`: epoch, step, fraction),
so a resumed run, which restores its epoch and step, restores every schedule too. ``t`` is the stage's progress in
epochs: ``epoch + step / steps_per_epoch`` (``per: step``, the default, smooth) or the epoch alone (``per: epoch``),
plus ``count_from`` (1 reproduces code that counts epochs from 1, e.g. mdistiller's DKD warm-up)::

    u = clamp((t - start) / epochs, 0, 1)
    linear, linear_warmup:  value = from + (to - from) * u           (linear_warmup: from defaults to 0)
    cosine:                 value = from + (to - from) * (1 - cos(pi * u)) / 2

Pure data and arithmetic: no torch, no knowledge of any method.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got the boolean {str(v).lower()}")
    return v


_Float = Annotated[float, BeforeValidator(_no_bool)]


class Schedule(BaseModel):
    """A value that follows the stage's progress (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    schedule: Literal["linear_warmup", "linear", "cosine"] = Field(
        description="shape of the curve: linear_warmup (from 0 unless given), linear, or cosine")
    to: _Float = Field(description="the value from `start + epochs` on")
    from_: Optional[_Float] = Field(None, alias="from", description="the value up to `start` (linear_warmup: 0)")
    epochs: _Float = Field(gt=0, description="length of the ramp in epochs, > 0 (may be fractional)")
    start: _Float = Field(0.0, ge=0, description="epoch at which the ramp starts, >= 0")
    per: Literal["step", "epoch"] = Field("step", description="'step': updated every step (smooth); 'epoch': "
                                                              "once per epoch")
    count_from: Literal[0, 1] = Field(0, description="1 counts epochs from 1, as some authors' code does "
                                                     "(mdistiller's DKD warm-up); 0 is the paper's count")

    @property
    def initial(self) -> float:
        return 0.0 if self.from_ is None else self.from_

    def value(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """The value at ``step`` (0-based, within the epoch) of ``epoch`` (0-based)."""
        t = float(epoch) + (step / steps_per_epoch if self.per == "step" and steps_per_epoch > 0 else 0.0)
        u = min(max((t + self.count_from - self.start) / self.epochs, 0.0), 1.0)
        if self.schedule == "cosine":
            u = (1.0 - math.cos(math.pi * u)) / 2.0
        return self.initial + (self.to - self.initial) * u

    def __format__(self, spec: str) -> str:
        """Printed where a weight is (``f"{weight:g}"``): the description, whatever the format."""
        return self.describe()

    def describe(self) -> str:
        """``linear_warmup 0 -> 8 over epochs 0..20 (per step)`` for ``kdgraph compile`` and logs."""
        end = self.start + self.epochs
        extra = ", epochs counted from 1" if self.count_from else ""
        return (f"{self.schedule} {self.initial:g} -> {self.to:g} over epochs {self.start:g}..{end:g} "
                f"(per {self.per}{extra})")


def is_schedule(value: Any) -> bool:
    """A spec value written as a schedule (a mapping with a ``schedule`` key)."""
    return isinstance(value, dict) and "schedule" in value
