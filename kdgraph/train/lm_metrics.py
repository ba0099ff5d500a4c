"""The evaluation of causal language models (``data.dataset: text``): perplexity, bits per token, KL to the teacher.

Over the held-out rows, each scored token ``t`` (label not -100, after the causal shift: logits at ``i`` predict
the label at ``i + 1``) adds the student's cross-entropy ``-log p_s(x_t)``; with a reference network (the
teacher) also ``KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))`` over the vocabulary (both sliced to the
smaller one when an embedding is padded). Summed over every process's tokens, then

* ``perplexity = exp(CE / N)``, ``bits_per_token = CE / (N ln 2)`` (N scored tokens),
* ``kl_to_teacher``: nats per token (absent without a reference),
* ``top1`` / ``top5``: next-token accuracy in % (the loop's "best" and the plot read ``top1``),
* ``tokens_per_s``: positions forwarded per second (rows x width, padding included; the teacher's forward
  counted in the time when there is one), ``tokens``: N, ``images``: rows.
"""
from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch
from torch import nn

from ..distiller.data import unpack_batch
from .distributed import DistEnv, all_reduce_sum
from .evaluation import _even_passes, _logits, _padded, autocast

__all__ = ["IGNORE_INDEX", "token_sums", "evaluate_lm", "describe_lm"]

IGNORE_INDEX = -100


def token_sums(logits: torch.Tensor, labels: torch.Tensor,
               reference: Optional[torch.Tensor] = None) -> tuple[float, float, int, int, int]:
    """``(CE sum, KL sum, top-1 hits, top-5 hits, scored tokens)`` of one batch of ``B x T x V`` logits."""
    keep = labels[:, 1:] != IGNORE_INDEX
    target = labels[:, 1:][keep]
    s = logits[:, :-1][keep].float()
    logp = torch.log_softmax(s, dim=-1)
    ce = -logp.gather(1, target[:, None]).sum()
    top = s.topk(min(5, s.shape[-1]), dim=-1).indices == target[:, None]
    kl = torch.zeros(())
    if reference is not None:
        v = min(s.shape[-1], reference.shape[-1])
        logq = torch.log_softmax(reference[:, :-1][keep].float()[:, :v], dim=-1)
        kl = (logq.exp() * (logq - torch.log_softmax(s[:, :v], dim=-1))).sum()
    return float(ce), float(kl), int(top[:, :1].sum()), int(top.any(dim=1).sum()), int(target.numel())


@torch.no_grad()
def evaluate_lm(model: nn.Module, loader: Any, env: DistEnv, amp: str = "off",
                reference: Optional[nn.Module] = None, restore: Optional[nn.Module] = None) -> dict[str, Any]:
    """The LM metrics of ``model`` over a validation loader of dict batches (module docstring); every process's
    tokens counted once. ``reference``: the network the KL is measured to (not when it is ``model`` itself)."""
    t0 = time.perf_counter()
    reference = None if reference is model else reference
    modes = [(m, m.training) for m in (model, reference) if m is not None]
    for m, _ in modes:
        m.eval()
    ce = kl = 0.0
    c1 = c5 = n = rows = positions = 0
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
        a, b, h1, h5, k = token_sums(logits, labels, ref)
        ce, kl, c1, c5, n = ce + a, kl + b, c1 + h1, c5 + h5, n + k
        rows, positions = rows + int(labels.shape[0]), positions + int(labels.numel())
    ce, kl, c1, c5, n, rows, positions = all_reduce_sum(env, [ce, kl, c1, c5, n, rows, positions])
    for m, was in modes:
        m.train(was)
    if restore is not None:
        restore.train()
    seconds = time.perf_counter() - t0
    n = max(int(n), 1)
    out = {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "perplexity": math.exp(min(ce / n, 700.0)),
           "bits_per_token": ce / n / math.log(2), "tokens": int(n), "tokens_per_s": round(positions / seconds, 1),
           "images": int(rows), "seconds": round(seconds, 2), "task": "lm"}
    if reference is not None:
        out["kl_to_teacher"] = kl / n
    return out


def describe_lm(ev: dict[str, Any]) -> str:
    """``perplexity 38.90  bits/token 5.28  KL to teacher 0.412  next-token top-1 31.20%``."""
    kl = f"  KL to teacher {ev['kl_to_teacher']:.4f}" if "kl_to_teacher" in ev else ""
    return (f"perplexity {ev['perplexity']:.2f}  bits/token {ev['bits_per_token']:.3f}{kl}  next-token top-1 "
            f"{ev['top1']:.2f}%  ({ev['tokens']:,} tokens, {ev['tokens_per_s']:,.0f} tokens/s)")
