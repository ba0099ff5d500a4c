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
    switches of the teacher passes; ``chunked_vocab``: tokens per chunk of the chunked vocabulary pass."""

    stage: StageSpec
    taps: Mapping[str, fx.Node] = field(default_factory=dict)
    fold_teacher_bn: bool = False
    teacher_channels_last: bool = False
    teacher_dtype: str = "fp32"  # fp32 | bf16 | fp16
    teacher_mkldnn: bool = False
    fsdp: Optional[Any] = None  # fsdp_schedule.ShardPlan of runtime.distributed: fsdp (None: off)
    chunked_vocab: Optional[int] = None  # runtime.chunked_vocab.chunk_tokens (None: off)
    #: "teacher" / "student" -> the user's module (its submodules' types and its config; the fused graph holds
    #: plain-Module copies of the hierarchy only)
    networks: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "taps", MappingProxyType(dict(self.taps)))
        object.__setattr__(self, "networks", MappingProxyType(dict(self.networks)))
