"""The networks a run trains: teacher and student built from the spec, compiled into a Distiller, their
weights loaded (what the spec names, then a checkpoint to resume or the spec's ``init_from``).

It uses the :class:`~kdgraph.distiller.Distiller` as any user loop would::

    d = kdgraph.compile(spec, teacher=teacher, student=student); d.load_weights()
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .. import models
from ..distiller import Distiller
from ..errors import CheckpointError, TrainingError
from ..spec import Spec
from ..models.weightio import brief, load_file
from ..models.weights import is_checkpoint, state_dict_of
from .checkpoint import Checkpoint
from .distributed import DistEnv

__all__ = ["build_distiller", "load_init_from", "first_stage"]


def first_stage(spec: Spec, only: Sequence[str], resume: Optional[Checkpoint]) -> int:
    """The stage the distiller starts in: the resumed one, else the first one ``--stage`` lets run."""
    if resume is not None:
        return resume.stage_index
    return next((i for i, s in enumerate(spec.stages) if not only or s.name in only), 0)


def build_distiller(spec: Spec, env: DistEnv, stage: int, resume: Optional[Checkpoint] = None,
                    resume_path: Optional[Path] = None, say=print) -> Distiller:
    """Teacher and student on ``env.device`` (seeded), compiled at ``stage``, with their weights: those the
    spec names, then the checkpoint's (``resume``) or else the spec's ``init_from``."""
    torch.manual_seed(spec.runtime.seed)
    teacher = models.build_model(spec.teacher, "teacher").to(env.device)
    student = models.build_model(spec.student, "student").to(env.device)
    if spec.runtime.sync_bn and env.distributed:
        if env.device.type != "cuda":
            raise TrainingError("runtime.sync_bn: PyTorch's SyncBatchNorm runs on CUDA only; on CPU set "
                                "sync_bn: false (each process then keeps its own BatchNorm statistics)")
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    d = Distiller.from_spec(spec, teacher=teacher, student=student, stage=stage)  # as kdgraph.compile
    d.load_weights()
    if resume is not None and spec.runtime.distributed == "fsdp":
        pass  # loaded after sharding, from the sharded folder (Trainer)
    elif resume is not None:
        try:
            d.load_state_dict(resume.distiller, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{resume_path} does not fit this spec's networks: {brief(e)}") from None
    elif spec.init_from:
        loaded = load_init_from(d, spec.init_from)
        say(f"init_from {spec.init_from}: loaded {', '.join(loaded)}")
    if spec.runtime.channels_last:
        d.to(memory_format=torch.channels_last)
    if spec.runtime.compile:
        d.use_torch_compile(True)
    return d


def load_init_from(distiller: nn.Module, path: str) -> list[str]:
    """``init_from``: a kdgraph checkpoint or a plain student state_dict into the student (strict) and,
    from a kdgraph checkpoint, into every adapter of the same name and shapes. Returns what was loaded."""
    obj = load_file(path, "init_from")
    sd = state_dict_of(obj, "student", f"init_from {path!r}")
    try:
        distiller.student.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"init_from {path!r} does not fit the student: {brief(e)}") from None
    loaded = ["student"]
    if not is_checkpoint(obj):
        return loaded
    for name, adapter in distiller.adapters.items():
        try:
            asd = state_dict_of(obj, f"adapters.{name}", f"init_from {path!r}")
        except CheckpointError:  # the checkpoint has no adapter of that name
            continue
        own = adapter.state_dict()
        if set(asd) == set(own) and all(asd[k].shape == own[k].shape for k in own):
            adapter.load_state_dict(asd, strict=True)
            loaded.append(f"adapter {name}")
    return loaded
