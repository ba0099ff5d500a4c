"""Evaluation: top-1 / top-5 of a network over a validation loader, every image counted once under DDP; GLUE's
metrics; a causal LM's perplexity, bits per token and KL to the teacher (:mod:`.lm_metrics`)."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Optional

import torch
from torch import nn

from ..distiller.data import unpack_batch
from ..errors import KDGraphError
from ..spec import Spec
from .data import make_loader
from .distributed import DistEnv, all_reduce_sum
from .lm_metrics import describe_lm, lm_summary, token_sums

__all__ = ["topk_counts", "evaluate_model", "evaluate_lm", "autocast", "validation_loader", "batch_size", "describe"]


def eval_task(spec: Any) -> Optional[str]:
    """What :func:`evaluate_model` scores for a spec's data: a GLUE task's name, ``"lm"`` for text, else ``None``."""
    if spec.data.dataset == "glue":
        return spec.data.task
    return "lm" if spec.data.dataset == "text" else None


def describe(ev: dict[str, Any]) -> str:
    """``top-1 71.20%  top-5 90.10%``, a GLUE task's metrics (``f1 87.50%  accuracy 82.10%``) or an LM's."""
    if ev.get("task") == "lm":
        return describe_lm(ev)
    if "task" in ev:
        return "  ".join(f"{k} {ev[k]:.2f}%" for k in ev["metrics"]) + f"  (GLUE {ev['task']} score {ev['top1']:.2f}%)"
    return f"top-1 {ev['top1']:.2f}%  top-5 {ev['top5']:.2f}%"


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
def batch_size(inputs: Any) -> int:
    """The number of examples of a batch's inputs: images, or a dict of named inputs."""
    if isinstance(inputs, dict):
        return int(next(iter(inputs.values())).shape[0])
    return int(inputs.shape[0])


def _logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    """The model's logits: ``model(images)``, or ``model(**inputs)`` for named inputs (a ModelOutput's logits)."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def _gathered(env: DistEnv, chunks: list[torch.Tensor]) -> torch.Tensor:
    mine = torch.cat(chunks).cpu() if chunks else torch.zeros(0)
    if not env.distributed:
        return mine
    import torch.distributed as dist

    every: list[Any] = [None] * env.world_size
    dist.all_gather_object(every, mine)
    return torch.cat([t for t in every if t.numel()])


def _even_passes(model: nn.Module, loader: Any, env: DistEnv) -> Optional[int]:
    """Under FSDP (a sharded ``model``), the number of forward passes every rank runs: the most batches any rank
    has (each pass all-gathers the units, so a rank with fewer batches would leave the others waiting). None:
    not sharded, each rank runs its own batches."""
    from torch.distributed.fsdp import FSDPModule

    if not env.distributed or not any(isinstance(m, FSDPModule) for m in model.modules()):
        return None
    import torch.distributed as dist

    mine = len(loader)
    t = torch.tensor([mine], dtype=torch.int64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    passes = int(t.item())
    if mine == 0 and passes > 0:
        raise KDGraphError(f"runtime.distributed: fsdp: process {env.rank} has no validation images to evaluate "
                           f"(fewer validation images than the {env.world_size} processes); use more validation "
                           f"data or fewer processes")
    return passes


def _padded(loader: Any, passes: Optional[int]) -> Any:
    """The loader's batches, then its last batch again until ``passes`` batches were given (FSDP padding)."""
    last = None
    for last in loader:
        yield last
    for _ in range(len(loader), passes or 0):
        yield last


def evaluate_model(model: nn.Module, loader: Any, env: DistEnv, amp: str = "off", channels_last: bool = False,
                   restore: Optional[nn.Module] = None, task: Optional[str] = None,
                   reference: Optional[nn.Module] = None) -> dict[str, Any]:
    """Top-1 / top-5 (%) of ``model`` over a validation loader whose sampler shards without padding, so
    that with several processes every image is counted exactly once (counts are summed). A sharded (FSDP2)
    ``model`` runs as many forward passes on every rank (a rank's last batch repeated, not counted). Afterwards
    ``restore`` (or else ``model``, if it was training) is put back in training mode.

    ``task``: a GLUE task: the outputs and labels of every process are gathered and scored with
    :func:`~kdgraph.train.glue_metrics.glue_metrics` (in %), ``top1`` being their mean (the task's score);
    batches are dicts of named inputs. ``task`` ``"lm"`` (``data.dataset: text``): a causal LM's perplexity, bits per
    token and KL to ``reference`` (:func:`~kdgraph.train.lm_metrics.evaluate_lm`)."""
    if task == "lm":
        return evaluate_lm(model, loader, env, amp, reference, restore)
    t0 = time.perf_counter()
    was = model.training
    model.eval()
    if env.distributed:
        import torch.distributed as dist

        for b in model.buffers():  # every process evaluates rank 0's BatchNorm statistics
            dist.broadcast(b.data, 0)
    c1 = c5 = n = 0
    outputs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    passes = _even_passes(model, loader, env)
    for i, batch in enumerate(_padded(loader, passes)):
        images, targets, _ = unpack_batch(batch)
        if isinstance(images, dict):
            images = {k: v.to(env.device, non_blocking=True) for k, v in images.items()}
        else:
            images = images.to(env.device, non_blocking=True)
            if channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(env.device, non_blocking=True)
        with autocast(amp, env.device), torch.no_grad():
            logits = _logits(model, images)
        if passes is not None and i >= len(loader):
            continue  # FSDP: a padding pass (every rank gathers every unit the same number of times), not counted
        if task is not None:
            outputs.append(logits.float().detach().cpu())
            labels.append(targets.cpu())
        else:
            a, b = topk_counts(logits.float(), targets)
            c1, c5 = c1 + a, c5 + b
        n += int(targets.shape[0])
    c1, c5, n = all_reduce_sum(env, [c1, c5, n])
    if restore is not None:
        restore.train()
    elif was:
        model.train()
    seconds = round(time.perf_counter() - t0, 2)
    if task is not None:
        from .glue_metrics import glue_metrics

        metrics = glue_metrics(task, _gathered(env, outputs).numpy(), _gathered(env, labels).numpy())
        pct = {k: 100.0 * v for k, v in metrics.items()}
        return {"top1": pct["score"], "top5": pct["score"], **pct, "task": task,
                "metrics": [k for k in metrics if k != "score"], "images": int(n), "seconds": seconds}
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "images": int(n), "seconds": seconds}


@torch.no_grad()
def evaluate_lm(model: nn.Module, loader: Any, env: DistEnv, amp: str = "off",
                reference: Optional[nn.Module] = None, restore: Optional[nn.Module] = None) -> dict[str, Any]:
    """A causal LM's metrics (:mod:`.lm_metrics`) over a validation loader of dict batches, every process's tokens
    counted once. ``reference``: the network the KL is measured to (none when it is ``model`` itself)."""
    t0 = time.perf_counter()
    reference = None if reference is model else reference
    modes = [(m, m.training) for m in (model, reference) if m is not None]
    for m, _ in modes:
        m.eval()
    sums = [0.0] * 7  # CE, KL, top-1, top-5, tokens, rows, positions
    passes = _even_passes(model, loader, env)
    for i, batch in enumerate(_padded(loader, passes)):
        inputs, labels, _ = unpack_batch(batch)
        inputs = {k: v.to(env.device, non_blocking=True) for k, v in inputs.items()}
        labels = labels.to(env.device, non_blocking=True)
        with autocast(amp, env.device):
            logits = _logits(model, inputs)
            ref = _logits(reference, inputs) if reference is not None else None
        if passes is not None and i >= len(loader):
            continue  # FSDP: a padding pass, not counted
        sums = [a + b for a, b in zip(sums, [*token_sums(logits, labels, ref), labels.shape[0], labels.numel()])]
    sums = all_reduce_sum(env, sums)
    for m, was in modes:
        m.train(was)
    if restore is not None:
        restore.train()
    return lm_summary(sums, time.perf_counter() - t0, reference is not None)


def validation_loader(spec: Spec, dataset: Any, env: DistEnv, batch_size: Optional[int] = None) -> Any:
    """The validation split, sharded over the processes without padding, in batches of ``batch_size``
    (default: the largest batch of the spec's stages)."""
    return make_loader(dataset, batch_size=batch_size or max(s.batch_size for s in spec.stages), train=False,
                       workers=spec.data.workers, seed=spec.runtime.seed, world_size=env.world_size, rank=env.rank,
                       pin_memory=env.device.type == "cuda")
