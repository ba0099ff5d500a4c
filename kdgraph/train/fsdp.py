"""FSDP2 for a Distiller (``runtime.distributed: fsdp``): ``fully_shard`` per unit, per network, and the root.

    torchrun --nproc_per_node=N your_loop.py
        dist.init_process_group("gloo")                  # or nccl
        d = kdgraph.compile(spec)                           # spec.runtime.distributed: fsdp
        d.load_weights()
        kdgraph.train.fsdp.shard(d)                         # before the optimizer: it holds the sharded parameters
        opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
        for images, targets in loader:                     # each process its own part of the global batch
            out = d(images, targets); out.loss.backward(); opt.step(); opt.zero_grad()

Wrapping order is FSDP2's: the deepest units first, then each sharded network (its root unit: what no unit
holds), then the Distiller itself (adapters, loss parameters; it is the module the user calls, so its own hooks
fire and make it FSDP2's root). A replicated teacher (``fsdp.teacher: replicated``) is left as it is and its
parameters are ignored by the root. The graph's ``fsdp_schedule`` pass runs each unit's gather and re-shard around
its nodes; here the units learn their prefetch order from that graph (the next unit entered in forward, the
previous in backward).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..compiler.passes.fsdp_schedule import prefetch_order, resolve_units
from ..errors import KDGraphError

__all__ = ["shard", "sharded_roles", "require_processes", "DTYPES"]

_NEEDS_GROUP = ("runtime.distributed: fsdp needs a process group: start the processes with torchrun "
                "(torchrun --nproc_per_node=N -m kdgraph train SPEC; N may be 1, e.g. to --resume a sharded run on "
                "one process) or call torch.distributed.init_process_group before kdgraph.train.fsdp.shard; to "
                "train one process without sharding, use runtime.distributed: ddp (the default)")


def require_processes(spec: Any, world_size: int) -> None:
    """``kdgraph train`` and fsdp: without torchrun there is no process group to shard over (one paragraph, exit
    2; ``torchrun --nproc_per_node=1`` is a group of one and is fine); a stage keeping an EMA of the student is
    refused too (the EMA copies the whole student on every process)."""
    if spec.runtime.distributed != "fsdp":
        return
    if world_size < 2 and not dist.is_initialized():
        raise KDGraphError(_NEEDS_GROUP)
    ema = [s.name for s in spec.stages if getattr(s, "ema", None) is not None]
    if ema:
        raise KDGraphError(f"stages.{ema[0]}.ema: an EMA of the student is not supported with runtime.distributed: "
                           f"fsdp (it would hold a whole, unsharded copy of the student on every process); remove "
                           f"the stage's ema or use runtime.distributed: ddp")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sharded_roles(spec: Any) -> list[str]:
    """The networks ``spec`` shards: the student, and the teacher unless it is replicated."""
    return (["teacher"] if spec.runtime.fsdp.teacher == "sharded" else []) + ["student"]


def _policy(spec: Any) -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    fs = spec.runtime.fsdp
    return MixedPrecisionPolicy(param_dtype=DTYPES.get(fs.param_dtype) if fs.param_dtype else None,
                                reduce_dtype=DTYPES.get(fs.reduce_dtype) if fs.reduce_dtype else None)


def shard(distiller: nn.Module, mesh: Optional[Any] = None) -> nn.Module:
    """Apply FSDP2 to ``distiller`` as its spec's ``runtime.fsdp`` says (in place; returns it).

    Needs a process group (torchrun); the spec must say ``runtime.distributed: fsdp`` (its graphs then carry the
    ``fsdp_schedule`` pass). Build the optimizer afterwards."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    spec = distiller.spec
    if spec.runtime.distributed != "fsdp":
        raise KDGraphError(f"spec {spec.name!r}: runtime.distributed is {spec.runtime.distributed!r}; sharding "
                           f"needs runtime.distributed: fsdp, which also schedules the gathers in the compiled "
                           f"graph (set it before kdgraph.compile)")
    _check_precision(distiller, spec)
    if not dist.is_initialized():
        raise KDGraphError(_NEEDS_GROUP)
    if isinstance(distiller, FSDPModule):
        raise KDGraphError("this distiller is sharded already (kdgraph.train.fsdp.shard was called before)")
    fs, mp = spec.runtime.fsdp, _policy(spec)
    kwargs: dict[str, Any] = {"mp_policy": mp}
    if mesh is not None:
        kwargs["mesh"] = mesh
    for role in sharded_roles(spec):
        net = getattr(distiller, role)
        units = resolve_units(net, getattr(fs, f"{role}_units"), f"runtime.fsdp.{role}_units")
        after = True if role == "teacher" else fs.reshard_after_forward
        for path in sorted(units, key=lambda p: -p.count(".")):  # deepest first
            fully_shard(net.get_submodule(path), reshard_after_forward=after, **kwargs)
        fully_shard(net, reshard_after_forward=after, **kwargs)
    ignored = set() if fs.teacher == "sharded" else set(distiller.teacher.parameters())
    fully_shard(distiller, ignored_params=ignored or None, **kwargs)
    set_prefetch(distiller)
    fully_shard.state(distiller)._lazy_init()  # the distiller is FSDP2's root even if a network is called first
    return distiller


def _check_precision(distiller: nn.Module, spec: Any) -> None:
    """``fsdp.param_dtype`` bf16/fp16 on the CPU with a sharded BatchNorm: FSDP2 casts the norm's weight but not its
    fp32 running statistics, and PyTorch's CPU batch_norm refuses the mix (a RuntimeError deep in the first step);
    one paragraph instead, before anything runs."""
    fs = spec.runtime.fsdp
    if fs.param_dtype in (None, "fp32"):
        return
    device = next(distiller.parameters()).device
    if device.type != "cpu":
        return
    for role in sharded_roles(spec):
        bn = next((n for n, m in getattr(distiller, role).named_modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
        if bn is not None:
            raise KDGraphError(f"runtime.fsdp.param_dtype: {fs.param_dtype} cannot run on the CPU with a sharded "
                               f"network that has BatchNorm ({role}.{bn}): FSDP2 gathers its weight in "
                               f"{fs.param_dtype} but its running statistics stay fp32, and PyTorch's CPU batch_norm "
                               f"refuses the mix. Use runtime.amp: bf16 (autocast) with param_dtype unset, "
                               f"fsdp.teacher: replicated for a BatchNorm teacher, or a GroupNorm/LayerNorm network")


def set_prefetch(distiller: nn.Module) -> None:
    """Each student unit prefetches the next unit the current stage's graph enters (forward) and the previous
    (backward)."""
    from torch.distributed.fsdp import FSDPModule

    # the teacher's prefetch is in the graph (fsdp_schedule's FrozenEnter); FSDP2's own hooks serve the student
    for role, units in prefetch_order(distiller.graph_module).items():
        if role != "student":
            continue
        units = [u for u in units if isinstance(u, FSDPModule)]
        for a, b in zip(units, units[1:]):
            a.set_modules_to_forward_prefetch([b])
            b.set_modules_to_backward_prefetch([a])
