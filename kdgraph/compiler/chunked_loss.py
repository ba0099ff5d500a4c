"""What the ``chunked_vocab`` pass's node runs: a token loss computed from final hidden states in chunks of tokens.

A token loss (:class:`~kdgraph.methods.token_base.TokenLoss`) over dense logits builds ``B x T x V`` logits for
each network (and, for the backward, their softmax): at vocabulary 49,152 and 512 tokens that is ~100 MB per
tensor in fp32. :func:`chunked_token_loss` instead keeps the ``N`` scored rows of the head's *input*
(``N x H``), and for each chunk of ``chunk_tokens`` rows computes::

    z = x_chunk @ W[:V]^T (+ b[:V]);   z = z * logit_scale;   z = tanh(z / cap) * cap      (as the config says)
    total += loss.per_token(z_student.float(), z_teacher.float()).sum()

under :func:`torch.utils.checkpoint.checkpoint` (non-reentrant): the forward keeps only each chunk's inputs, the
backward recomputes one chunk's logits at a time, so at most one ``chunk_tokens x V`` block (and its softmax) is
alive in forward and in backward. A side whose inputs need no gradient (the frozen teacher) is computed under
``no_grad``. The result is ``loss.normalise(total, kept, num_tokens)``: the same value as the loss's own
``forward`` on dense logits, and the same gradients (a tied embedding gets both its embedding and its head share,
since ``W`` is the shared parameter itself).

A side is a :class:`Head` (hidden states, weight, bias, scale, softcap) or a :class:`Dense` (logits another node
computes anyway), indexed chunk by chunk. A teacher read from a top-K cache (``runtime.teacher_cache``: a
:class:`~kdgraph.methods.token_sparse.SparseTeacher` batch input, already one row per kept token) is checked
against the loss (``check_for``) and sliced chunk by chunk alike, each chunk scored by the loss's
``per_token_sparse``: the same value and gradients as the dense path's ``forward`` on the sparse teacher.

Several losses over one student head (the usual ``token_ce`` + ``token_kl``) are computed together by
:func:`chunked_token_losses`: each chunk's student logits once in forward and once in backward's recomputation,
scored by every loss, instead of once per loss.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ..methods.token_sparse import SparseTeacher

__all__ = ["Head", "Dense", "head_logits", "chunked_token_loss", "chunked_token_losses"]


class Head(NamedTuple):
    """A Linear output head: its input ``hidden`` (``B x T x H``), ``weight`` (``V x H``), ``bias`` and the
    post-processing the model's config declares (``scale``: Cohere's ``logit_scale``; ``softcap``: Gemma2's
    ``final_logit_softcapping``)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    scale: Optional[float] = None
    softcap: Optional[float] = None


class Dense(NamedTuple):
    """Logits that exist anyway (``B x T x V``)."""

    logits: torch.Tensor


Side = Union[Head, Dense]


def head_logits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: Optional[float],
                softcap: Optional[float]) -> torch.Tensor:
    """The head's logits for rows ``x``, scaled and soft-capped in the order the models apply them."""
    z = F.linear(x.to(weight.dtype), weight, bias)
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


_IDS = ("ids",)  # the head of the labels' target ids (a loss against the labels): rows that are ids


def _rows(loss, side: Side, mask: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The kept rows of a side (``N x H`` hidden or ``N x V`` logits) and what turns a chunk of them into logits."""
    if isinstance(side, Dense):
        return loss.align(side.logits)[mask], ()
    x = side.hidden[:, :-1] if loss.shift else side.hidden
    v = loss.vocab_size
    weight = side.weight if v is None else side.weight[:v]
    bias = side.bias if side.bias is None or v is None else side.bias[:v]
    return x[mask], (weight, bias, side.scale, side.softcap)


def _logits(rows: torch.Tensor, head: tuple) -> torch.Tensor:
    if head is _IDS:  # target ids: as they are
        return rows
    if not head:
        return rows.float()
    grad = torch.is_grad_enabled() and (rows.requires_grad or any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in head[:2]))
    with torch.set_grad_enabled(grad):
        return head_logits(rows, *head).float()


def chunked_token_loss(loss, labels: torch.Tensor, num_tokens: Optional[torch.Tensor], chunk_tokens: int,
                       student: Side, teacher: Optional[Side]) -> torch.Tensor:
    """``loss`` (a TokenLoss) over ``student`` and ``teacher`` in chunks of ``chunk_tokens`` kept tokens; with no
    teacher (``token_ce``) the loss's ``per_token`` scores the student's logits against ``targets(labels)``."""
    return chunked_token_losses((loss,), labels, (num_tokens,), chunk_tokens, student, (teacher,))[0]


def _other_side(loss, teacher: Optional[Side], labels: torch.Tensor, mask: torch.Tensor, s_rows: torch.Tensor,
                s_head: tuple) -> tuple[torch.Tensor, tuple, Optional[SparseTeacher]]:
    """A loss's other side as ``(rows, head, sparse)``: the labels' kept targets (no teacher), a top-K cached
    teacher's row numbers (checked against the loss and the mask), or a teacher's kept rows and head."""
    if teacher is None:  # the labels' kept targets, chunked alike (integer ids: no head, no float)
        return loss.targets(labels)[mask], _IDS, None
    if isinstance(teacher, Dense) and isinstance(teacher.logits, SparseTeacher):  # runtime.teacher_cache
        sparse = teacher.logits
        sparse.check_for(loss, mask, int(s_head[0].shape[0]) if s_head else int(s_rows.shape[-1]))
        return torch.arange(len(sparse), device=s_rows.device), (), sparse
    rows, head = _rows(loss, teacher, mask)
    return rows, head, None


def chunked_token_losses(losses, labels: torch.Tensor, num_tokens, chunk_tokens: int, student: Side,
                         teachers) -> tuple[torch.Tensor, ...]:
    """Several token losses over one ``student`` side, chunk by chunk: each chunk's student logits are computed
    once (and recomputed once in backward) and scored by every loss against its own side of ``teachers`` (``None``:
    the labels). The losses must agree on ``shift`` and ``vocab_size`` (one mask, one head slice); each result is
    normalised by its own ``num_tokens`` (one per loss) and equals :func:`chunked_token_loss` of that loss alone."""
    lead = losses[0]
    if any(loss.shift != lead.shift or loss.vocab_size != lead.vocab_size for loss in losses[1:]):
        raise ValueError("chunked_token_losses: the losses must agree on shift and vocab_size")
    mask = lead.token_mask(labels)
    s_rows, s_head = _rows(lead, student, mask)
    others = [_other_side(loss, t, labels, mask, s_rows, s_head) for loss, t in zip(losses, teachers)]
    n, k = s_rows.shape[0], len(losses)
    # the chunk function's tensor arguments: student head (weight, bias), then each teacher head's (weight, bias)
    params = [s_head[0] if s_head else None, s_head[1] if s_head else None]
    for _, head, _ in others:
        params += [head[0], head[1]] if head and head is not _IDS else [None, None]

    def chunk(s: torch.Tensor, *rest) -> torch.Tensor:
        ts, ps = rest[:k], rest[k:]
        z = _logits(s, (ps[0], ps[1], *s_head[2:]) if s_head else ())
        sums = []
        for i, (loss, (_, head, sparse)) in enumerate(zip(losses, others)):
            t = ts[i]
            if sparse is not None:  # t: the chunk's row numbers in the sparse teacher
                a, b = (int(t[0]), int(t[-1]) + 1) if t.numel() else (0, 0)
                part = SparseTeacher(sparse.ids[a:b], sparse.logp[a:b], sparse.tail[a:b], sparse.vocab_size,
                                     sparse.temperature, sparse.shift)
                sums.append(loss.per_token_sparse(z, part).sum())
                continue
            th = _IDS if head is _IDS else (ps[2 + 2 * i], ps[3 + 2 * i], *head[2:]) if head else ()
            sums.append(loss.per_token(z, _logits(t, th)).sum())
        return torch.stack(sums)

    needs_grad = torch.is_grad_enabled() and any(
        isinstance(p, torch.Tensor) and p.requires_grad for p in (s_rows, *(o[0] for o in others), *params))
    total = s_rows.new_zeros((k,), dtype=torch.float32)
    for start in range(0, max(n, 1), chunk_tokens):  # no kept token: one empty chunk, a zero with a grad_fn
        s = s_rows[start:start + chunk_tokens]
        ts = [o[0][start:start + chunk_tokens] for o in others]
        if needs_grad:
            total = total + checkpoint(chunk, s, *ts, *params, use_reentrant=False)
        else:
            total = total + chunk(s, *ts, *params)
    kept = mask.sum()
    return tuple(loss.normalise(total[i], kept, num) for i, (loss, num) in enumerate(zip(losses, num_tokens)))
