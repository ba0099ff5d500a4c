"""A sparse teacher distribution: the value a token loss reads in place of dense teacher logits when the teacher's
``lm_head`` comes from a top-K cache (``kdgraph cache-teacher``, :mod:`kdgraph.train.teacher_cache.tokens`).

For each kept token (the rows of ``align(logits)[token_mask(labels)]``, in that order) it holds the teacher's K
most likely token ids, their log-probabilities ``log p_t,k`` at the loss temperature (over the whole, sliced,
vocabulary; stored in bf16) and the tail mass ``m_t = 1 - sum_k p_t,k`` (fp32, computed before rounding).

The sparse forward KL (:func:`sparse_forward_kl`) has two treatments of the tail, chosen by the loss's
``sparse_tail`` argument:

- ``bucket`` (default): the KL between the two distributions coarsened to K + 1 outcomes, the K kept tokens and
  one "everything else" bucket (teacher mass ``m_t``, student mass ``m_s = 1 - sum_k p_s,k``)::

      L = sum_k p_t,k (log p_t,k - log p_s,k)  +  m_t (log m_t - log m_s)

  A lower bound of the full KL (data processing inequality), equal to it when K = V (``m_t = 0``); the student is
  still told how much mass belongs outside the support. This is the "other bucket" truncation of the top-K
  distillation literature (e.g. MaxText's ``kd_truncation_strategy: other_bucket``; the ghost-token analysis of
  Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs", ACL 2025, sec. 3).
- ``zero``: the top-K sum alone, ``sum_k p_t,k (log p_t,k - log p_s,k)`` (DistillKit's default
  ``missing_probability_handling: zero``, arcee-ai/DistillKit). It does not penalise student mass outside the
  support.

The student's log-probabilities are always normalised over the whole vocabulary. ``m_s`` is computed as
``1 - sum_k p_s,k`` in float64 from the gathered log-probabilities (no second ``N x V`` pass), except on the rows
where the student's support mass exceeds ``1 - COMPLEMENT_FLOOR`` (0.95): there the subtraction would lose digits,
and ``m_s`` is a log-sum-exp over the tokens outside the support, so small tails keep their precision. Both are the
same function (values and gradients agree to float rounding; ``tests/test_token_cache.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.nn import functional as F

from ..errors import KDGraphError

__all__ = ["SparseTeacher", "sparse_from_logits", "sparse_forward_kl", "SPARSE_TAILS"]

SPARSE_TAILS = ("bucket", "zero")

#: below this student tail mass, ``1 - sum_k p_s,k`` loses digits and the tail is summed outside the support
COMPLEMENT_FLOOR = 0.05


@dataclass
class SparseTeacher:
    """The teacher's top-K distribution of ``N`` kept tokens (see the module docstring)."""

    ids: torch.Tensor        # int64 N x K, token ids (sorted by decreasing probability)
    logp: torch.Tensor       # N x K, log p_t at ``temperature`` (bf16 from a cache, fp32 live)
    tail: torch.Tensor       # float32 N, 1 - sum_k p_t,k
    vocab_size: int          # the (sliced) vocabulary the probabilities are normalised over
    temperature: float       # the temperature the log-probabilities were taken at
    shift: bool = True       # whether the kept tokens were selected with the causal shift
    lengths: Optional[torch.Tensor] = None  # int64 B: kept tokens per sequence (rows of the batch), when known

    def to(self, *args: Any, **kwargs: Any) -> "SparseTeacher":
        """On another device (dtypes kept)."""
        dev = kwargs.get("device", args[0] if args else None)
        return SparseTeacher(self.ids.to(dev), self.logp.to(dev), self.tail.to(dev), self.vocab_size,
                             self.temperature, self.shift, self.lengths)

    def rows(self, start: int, stop: int) -> "SparseTeacher":
        """The kept tokens of batch rows ``start:stop`` (a micro-batch of the same batch); needs ``lengths``."""
        if self.lengths is None:
            raise KDGraphError("a sparse teacher without per-sequence lengths cannot be split by batch rows")
        ends = torch.cat([self.lengths.new_zeros(1), self.lengths.cumsum(0)])
        a, b = int(ends[start]), int(ends[stop])
        return SparseTeacher(self.ids[a:b], self.logp[a:b], self.tail[a:b], self.vocab_size, self.temperature,
                             self.shift, self.lengths[start:stop])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def check_for(self, loss: Any, mask: torch.Tensor, vocab: int, where: str = "the cached teacher") -> None:
        """Raise one paragraph if this distribution was not made for ``loss`` on the tokens ``mask`` keeps."""
        problems = []
        kept = int(mask.sum())
        per_row = mask.sum(1).cpu()
        if len(self) != kept:
            problems.append(f"it holds {len(self)} tokens but the labels keep {kept} (another data set, "
                            f"max_length or packing)")
        elif self.lengths is not None and not torch.equal(self.lengths.cpu().long(), per_row.long()):
            row = int((self.lengths.cpu().long() != per_row.long()).nonzero()[0, 0])
            problems.append(f"batch row {row} keeps {int(per_row[row])} tokens but its cached record holds "
                            f"{int(self.lengths[row])} (the batch's sequences are not the ones it was read for)")
        if self.vocab_size != vocab:
            problems.append(f"its vocabulary has {self.vocab_size} entries but the student's sliced logits {vocab} "
                            f"(set args.vocab_size to the cache's vocabulary)")
        if abs(self.temperature - float(loss.temperature)) > 1e-12:
            problems.append(f"its log-probabilities are at temperature {self.temperature:g} but the loss uses "
                            f"{float(loss.temperature):g} (the tail mass depends on it: cache again with "
                            f"--temperature {float(loss.temperature):g})")
        if self.shift != bool(loss.shift):
            problems.append(f"it was made with shift: {str(self.shift).lower()} but the loss has shift: "
                            f"{str(bool(loss.shift)).lower()}")
        if problems:
            raise KDGraphError(f"{where} (a top-K teacher cache) does not fit this token loss: "
                               + "; ".join(problems) + ". Nothing is recomputed: make the cache for this spec "
                               "(kdgraph cache-teacher SPEC --topk K --out DIR --overwrite).")


def sparse_from_logits(logits: torch.Tensor, k: int, temperature: float = 1.0, shift: bool = True) -> SparseTeacher:
    """The top-``k`` sparse distribution of ``N x V`` teacher logits (fp32 values: the live teacher's)."""
    logp_full = F.log_softmax(logits.float() / temperature, dim=-1)
    logp, ids = logp_full.topk(k, dim=-1)
    tail = (1.0 - logp.double().exp().sum(-1)).clamp_min(0.0).float()
    if k >= logits.shape[-1]:
        tail = torch.zeros_like(tail)
    return SparseTeacher(ids.long(), logp, tail, int(logits.shape[-1]), float(temperature), shift)


def sparse_forward_kl(student: torch.Tensor, teacher: SparseTeacher, temperature: float,
                      tail: str = "bucket") -> torch.Tensor:
    """Per-token forward KL ``KL(p_t || p_s)`` of ``N x V`` student logits against a sparse teacher (``N``)."""
    if tail not in SPARSE_TAILS:
        raise ValueError(f"sparse tail must be one of {SPARSE_TAILS}, got {tail!r}")
    z = student.float()
    if temperature != 1.0:  # (a full N x V copy: skipped at T = 1)
        z = z / temperature
    log_z = torch.logsumexp(z, dim=-1, keepdim=True)
    ids = teacher.ids.to(z.device).long()
    log_ps = z.gather(-1, ids) - log_z
    log_pt = teacher.logp.to(z.device).float()
    loss = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if tail == "zero" or ids.shape[-1] >= z.shape[-1]:  # K = V: no token outside the support, no tail term
        return loss
    m_t = teacher.tail.to(z.device).float()
    log_ms = _log_outside_mass(z, log_z, ids, log_ps)
    term = m_t * (torch.log(m_t.clamp_min(1e-30)) - log_ms)
    return loss + torch.where(m_t > 0, term, torch.zeros_like(term))


def _log_outside_mass(z: torch.Tensor, log_z: torch.Tensor, ids: torch.Tensor, log_ps: torch.Tensor) -> torch.Tensor:
    """``log m_s``, the student's log-probability of the tokens outside the support, per row: ``log(1 - sum_k
    p_s,k)`` in float64; rows with ``m_s < COMPLEMENT_FLOOR`` instead take the log-sum-exp of the logits outside the
    support (the support scattered to -1e30: its gradient there is zero), on those rows only."""
    m_s = 1.0 - log_ps.double().exp().sum(-1)
    log_ms = torch.log(m_s.clamp_min(1e-300)).float()
    close = (m_s < COMPLEMENT_FLOOR).nonzero()[:, 0]
    if close.numel():
        outside = z[close].scatter(-1, ids[close], -1e30)
        exact = torch.logsumexp(outside, dim=-1) - log_z[close, 0]
        log_ms = log_ms.index_put((close,), exact)
    return log_ms
