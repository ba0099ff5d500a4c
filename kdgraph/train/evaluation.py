"""Evaluation: top-1 / top-5 of a network over a validation loader, every image counted once under DDP."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Optional

import torch
from torch import nn

from ..data import unpack_batch
from ..spec import Spec
from .data import make_loader
from .distributed import DistEnv, all_reduce_sum

__all__ = ["topk_counts", "evaluate_model", "autocast", "validation_loader"]


def autocast(amp: str, device: torch.device) -> Any:
    """The autocast context of ``runtime.amp`` (``off``: none; ``bf16`` / ``fp16``)."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def topk_counts(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """How many rows have the target first (top-1) and among the first five (top-5; all when fewer classes)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == targets[:, None]
    return int(hit[:, :1].sum()), int(hit.any(dim=1).sum())


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Any, env: DistEnv, amp: str = "off", channels_last: bool = False,
                   restore: Optional[nn.Module] = None) -> dict[str, Any]:
    """Top-1 / top-5 (%) of ``model`` over a validation loader whose sampler shards without padding, so
    that with several processes every image is counted exactly once (counts are summed). Afterwards
    ``restore`` (or else ``model``, if it was training) is put back in training mode."""
    t0 = time.perf_counter()
    was = model.training
    model.eval()
    if env.distributed:
        import torch.distributed as dist

        for b in model.buffers():  # every process evaluates rank 0's BatchNorm statistics
            dist.broadcast(b.data, 0)
    c1 = c5 = n = 0
    for batch in loader:
        images, targets, _ = unpack_batch(batch)
        images = images.to(env.device, non_blocking=True)
        if channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(env.device, non_blocking=True)
        with autocast(amp, env.device):
            logits = model(images)
        a, b = topk_counts(logits.float(), targets)
        c1, c5, n = c1 + a, c5 + b, n + int(targets.shape[0])
    c1, c5, n = all_reduce_sum(env, [c1, c5, n])
    if restore is not None:
        restore.train()
    elif was:
        model.train()
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "images": int(n),
            "seconds": round(time.perf_counter() - t0, 2)}


def validation_loader(spec: Spec, dataset: Any, env: DistEnv, batch_size: Optional[int] = None) -> Any:
    """The validation split, sharded over the processes without padding, in batches of ``batch_size``
    (default: the largest batch of the spec's stages)."""
    return make_loader(dataset, batch_size=batch_size or max(s.batch_size for s in spec.stages), train=False,
                       workers=spec.data.workers, seed=spec.runtime.seed, world_size=env.world_size, rank=env.rank,
                       pin_memory=env.device.type == "cuda")
