"""The ``runtime.fsdp`` section of the spec (sharding units, mixed precision, teacher placement); part of
:mod:`kdgraph.spec.schema`, its own module to keep that one short. Knows nothing of torch."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FSDPSpec"]


class FSDPSpec(BaseModel):
    """``runtime.fsdp``: how ``runtime.distributed: fsdp`` shards the networks (FSDP2, ``fully_shard``)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    teacher_units: list[str] = Field(default_factory=list, max_length=4096, description="the teacher's sharding "
                                     "units: module paths ('layer1.0'), glob patterns over paths ('layer*.*') or "
                                     "'type:CLASS' (every module of that class, e.g. 'type:BasicBlock'); each must "
                                     "match a module. The rest of the teacher is one more unit (its root)")
    student_units: list[str] = Field(default_factory=list, max_length=4096, description="the student's sharding "
                                     "units, written like teacher_units")
    teacher: Literal["sharded", "replicated"] = Field("sharded", description="'sharded': the frozen teacher's "
                                                      "parameters are split over the processes and gathered per unit "
                                                      "around its nodes; 'replicated': every process holds the whole "
                                                      "teacher (no gathers; allows the teacher BatchNorm passes)")
    param_dtype: Optional[Literal["fp32", "bf16", "fp16"]] = Field(None, description="mixed precision: the dtype "
                                                                   "parameters are gathered and computed in (None: "
                                                                   "their own)")
    reduce_dtype: Optional[Literal["fp32", "bf16", "fp16"]] = Field(None, description="mixed precision: the dtype "
                                                                    "gradients are reduce-scattered in (None: "
                                                                    "param_dtype)")
    reshard_after_forward: bool = Field(True, description="free the student units' gathered parameters after their "
                                                          "forward and gather them again in backward (FSDP2's "
                                                          "default; false keeps them until the backward is done)")
