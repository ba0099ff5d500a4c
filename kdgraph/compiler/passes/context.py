"""What every pass gets besides the graph: a small, explicit context (no hidden state between passes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional

import torch.fx as fx

from ...spec import StageSpec

__all__ = ["PassContext"]


@dataclass(frozen=True)
class PassContext:
    """``stage``: the stage's spec; ``taps``: tap text -> the fused node whose value that tap reads;
    ``fold_teacher_bn``, ``teacher_channels_last``, ``teacher_dtype``, ``teacher_mkldnn``: the spec's ``runtime``
    switches of the teacher passes."""

    stage: StageSpec
    taps: Mapping[str, fx.Node] = field(default_factory=dict)
    fold_teacher_bn: bool = False
    teacher_channels_last: bool = False
    teacher_dtype: str = "fp32"  # fp32 | bf16 | fp16
    teacher_mkldnn: bool = False
    fsdp: Optional[Any] = None  # fsdp_schedule.ShardPlan of runtime.distributed: fsdp (None: off)

    def __post_init__(self) -> None:
        object.__setattr__(self, "taps", MappingProxyType(dict(self.taps)))
