"""Processes and devices: torchrun's environment, DDP wrapping of what trains, collective helpers.

``torchrun --nproc_per_node=N -m kdgraph train SPEC`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`setup` joins the process group (NCCL on GPUs, gloo on CPU). A plain
``kdgraph train`` is a world of one and uses no process group.

DDP wraps the distiller but synchronises only what the current stage trains: the teacher's
parameters and buffers, frozen adapters, and loss state (CRD's memory banks, which each process
updates with its own samples) are excluded with
``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``. A stage that changes
what trains gets a new wrapper (:func:`wrap`), so ``find_unused_parameters`` is never needed.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import KDGraphError

__all__ = ["DistEnv", "setup", "teardown", "barrier", "all_reduce_sum", "all_gather_object", "ignored_names",
           "wrap"]


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: Optional[str] = None, group: bool = False) -> DistEnv:
    """Read torchrun's environment, pick the device, join the process group when ``WORLD_SIZE > 1`` (or, with
    ``group``, under torchrun with one process: ``runtime.distributed: fsdp`` shards over a group of one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KDGraphError("--device cuda was asked for but no CUDA device is available")
        if device == "cuda":
            device = f"cuda:{local % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(device))
    dev = torch.device(device)
    backend = None
    if world > 1 or (group and "WORLD_SIZE" in os.environ):
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():
            kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=30)}
            if dev.type == "cuda":
                kwargs["device_id"] = dev
            dist.init_process_group(**kwargs)
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world, local, dev, backend)


def teardown(env: DistEnv) -> None:
    if env.backend is not None and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_sum(env: DistEnv, values: list[float]) -> list[float]:
    """Sum a few numbers over all processes (float64)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_object(env: DistEnv, obj: Any) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def ignored_names(model: nn.Module, synced: nn.Module | None = None) -> list[str]:
    """Names (as ``model.named_parameters()`` / ``named_buffers()`` spell them) DDP must leave alone:
    every parameter that does not train, and every buffer outside the modules listed in ``synced``.

    ``synced`` is a module whose buffers are broadcast from rank 0 (the student's BatchNorm
    statistics, trainable adapters' buffers); default: all buffers of modules that own a trainable
    parameter.
    """
    names = [n for n, p in model.named_parameters() if not p.requires_grad]
    keep: set[int] = set()
    if synced is not None:
        keep = {id(b) for b in synced.buffers()}
    else:
        for m in model.modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                keep.update(id(b) for b in m.buffers(recurse=False))
    names += [n for n, b in model.named_buffers() if id(b) not in keep]
    return names


def wrap(module: nn.Module, env: DistEnv, synced: nn.Module | None = None) -> nn.Module:
    """DistributedDataParallel over the trainable part of ``module``; the module itself in a world of one."""
    if not env.distributed:
        return module
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):  # runtime.distributed: fsdp, sharded once by the trainer (train.fsdp.shard)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not any(p.requires_grad for p in module.parameters()):
        raise KDGraphError("nothing trains in this stage (no parameter requires grad); check the stage's `train` list")
    DDP._set_params_and_buffers_to_ignore_for_model(module, ignored_names(module, synced))
    kwargs: dict[str, Any] = {"gradient_as_bucket_view": True}  # buffers of what trains: broadcast from rank 0
    if env.device.type == "cuda":
        kwargs["device_ids"] = [env.device.index]
    return DDP(module, **kwargs)
