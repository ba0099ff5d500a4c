"""The metrics of causal language models (``data.dataset: text``): perplexity, bits per token, KL to the teacher.

Over the held-out rows, each scored token ``t`` (label not -100, after the causal shift: logits at ``i`` predict
the label at ``i + 1``) adds the student's cross-entropy ``-log p_s(x_t)``; with a reference network (the
teacher) also ``KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))`` over the vocabulary (both sliced to the
smaller one when an embedding is padded). Summed over every process's tokens, then

* ``perplexity = exp(CE / N)``, ``bits_per_token = CE / (N ln 2)`` (N scored tokens),
* ``kl_to_teacher``: nats per token (absent without a reference),
* ``top1`` / ``top5``: next-token accuracy in % (the loop's "best" and the plot read ``top1``),
* ``tokens_per_s``: scored tokens (N) per second; ``positions_per_s``: positions forwarded per second (rows x
  width, padding included); the teacher's forward is counted in the time when there is one; ``tokens``: N,
  ``images``: rows.

The loop over the validation batches is :func:`kdgraph.train.evaluation.evaluate_lm` (``evaluate_model`` with
``task="lm"``, which ``kdgraph train`` uses for ``data.dataset: text``).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

__all__ = ["IGNORE_INDEX", "token_sums", "lm_summary", "describe_lm"]

IGNORE_INDEX = -100


def token_sums(logits: torch.Tensor, labels: torch.Tensor, reference: Optional[torch.Tensor] = None,
               chunk: int = 1024) -> tuple[float, float, int, int, int]:
    """``(CE sum, KL sum, top-1 hits, top-5 hits, scored tokens)`` of one batch of ``B x T x V`` logits, computed
    ``chunk`` scored tokens at a time (fp32 copies of ``chunk x V``, never of the whole batch)."""
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    targets = labels[:, 1:][rows, cols]
    ce = kl = torch.zeros((), dtype=torch.float64, device=logits.device)
    c1 = c5 = 0
    for a in range(0, int(targets.numel()), chunk):
        r, c, target = rows[a:a + chunk], cols[a:a + chunk], targets[a:a + chunk]
        s = logits[r, c].float()  # position c predicts label c + 1
        logp = torch.log_softmax(s, dim=-1)
        ce = ce - logp.gather(1, target[:, None]).sum().double()
        top = s.topk(min(5, s.shape[-1]), dim=-1).indices == target[:, None]
        c1, c5 = c1 + int(top[:, :1].sum()), c5 + int(top.any(dim=1).sum())
        if reference is not None:
            v = min(s.shape[-1], reference.shape[-1])
            logq = torch.log_softmax(reference[r, c].float()[:, :v], dim=-1)
            logp = logp if v == s.shape[-1] else torch.log_softmax(s[:, :v], dim=-1)
            kl = kl + (logq.exp() * (logq - logp)).sum().double()
    return float(ce), float(kl), c1, c5, int(targets.numel())


def lm_summary(sums: list[float], seconds: float, with_kl: bool) -> dict[str, Any]:
    """The evaluation record from ``[CE sum, KL sum, top-1 hits, top-5 hits, tokens, rows, positions]`` summed over
    the processes and the time it took."""
    ce, kl, c1, c5, n, rows, positions = sums
    n = max(int(n), 1)
    out = {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "perplexity": math.exp(min(ce / n, 700.0)),
           "bits_per_token": ce / n / math.log(2), "tokens": int(n), "tokens_per_s": round(n / seconds, 1),
           "positions_per_s": round(positions / seconds, 1),
           "images": int(rows), "seconds": round(seconds, 2), "task": "lm"}
    if with_kl:
        out["kl_to_teacher"] = kl / n
    return out


def describe_lm(ev: dict[str, Any]) -> str:
    """``perplexity 38.90  bits/token 5.28  KL to teacher 0.412  next-token top-1 31.20%``."""
    kl = f"  KL to teacher {ev['kl_to_teacher']:.4f}" if "kl_to_teacher" in ev else ""
    return (f"perplexity {ev['perplexity']:.2f}  bits/token {ev['bits_per_token']:.3f}{kl}  next-token top-1 "
            f"{ev['top1']:.2f}%  ({ev['tokens']:,} tokens, {ev['tokens_per_s']:,.0f} tokens/s)")
