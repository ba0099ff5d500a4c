"""Step time of token_ce + token_kl over one student head: fused (one chunked pass) vs each loss its own pass.

    python benchmarks/chunked_fused.py [--vocab 49152] [--hidden 128] [--rows 8] [--seq 256] [--chunk 256]
                                       [--topk 64] [--reps 7]

The Austen demo's loss step in isolation: the student's final hidden states (``rows x seq x hidden``, requires grad)
and a tied head (``vocab x hidden``), 0.5 next-token CE + 0.5 KL to a top-K teacher (a ``SparseTeacher``, as
``runtime.teacher_cache`` gives), chunked by ``--chunk`` tokens. "fused" is what the ``chunked_vocab`` pass now
builds (:func:`~kdgraph.compiler.chunked_loss.chunked_token_losses`: each chunk's student logits once, recomputed
once in the backward); "separate" is the two losses each through
:func:`~kdgraph.compiler.chunked_loss.chunked_token_loss` (the pass before fusing). Both run in this one process,
alternating, ``--reps`` times each after a warm-up; the median forward + backward wall time is printed with the
ratio, and the two results are checked equal (values and head gradients).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdgraph.compiler.chunked_loss import Dense, Head, chunked_token_loss, chunked_token_losses  # noqa: E402
from kdgraph.methods.token_ce import TokenCE  # noqa: E402
from kdgraph.methods.token_kl import TokenKL  # noqa: E402
from kdgraph.methods.token_sparse import sparse_from_logits  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.rows, a.seq, a.hidden, generator=g).requires_grad_()
    w = (torch.randn(a.vocab, a.hidden, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, a.vocab, (a.rows, a.seq), generator=g)
    keep = labels[:, 1:] != -100
    with torch.no_grad():  # a teacher's top-K over the kept tokens, built in blocks (no rows x seq x vocab tensor)
        t_rows = torch.randn(int(keep.sum()), a.hidden, generator=g)
        parts = [sparse_from_logits(t_rows[i:i + 256] @ w.detach().T * 3, a.topk, 1.0)
                 for i in range(0, len(t_rows), 256)]
        teacher = type(parts[0])(torch.cat([p.ids for p in parts]), torch.cat([p.logp for p in parts]),
                                 torch.cat([p.tail for p in parts]), a.vocab, 1.0, True)
    ce, kl = TokenCE(), TokenKL()

    def fused():
        c, k = chunked_token_losses((ce, kl), labels, (None, None), a.chunk, Head(x, w), (None, Dense(teacher)))
        return 0.5 * c + 0.5 * k

    def separate():
        return 0.5 * chunked_token_loss(ce, labels, None, a.chunk, Head(x, w), None) + \
            0.5 * chunked_token_loss(kl, labels, None, a.chunk, Head(x, w), Dense(teacher))

    times: dict[str, list[float]] = {"fused": [], "separate": []}
    results = {}
    for rep in range(a.reps + 1):
        for name, fn in (("fused", fused), ("separate", separate)):
            t0 = time.perf_counter()
            loss = fn()
            gx, gw = torch.autograd.grad(loss, (x, w))
            if rep:
                times[name].append(time.perf_counter() - t0)
            results[name] = (loss.detach(), gx, gw)
    for got, want in zip(results["fused"], results["separate"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"vocab {a.vocab}, hidden {a.hidden}, {a.rows} x {a.seq} tokens, chunks of {a.chunk}, top-{a.topk} "
          f"teacher, {torch.get_num_threads()} threads, {a.reps} reps")
    for k, v in med.items():
        print(f"  {k:9s} forward + backward median {v * 1000:8.1f} ms  (min {min(times[k]) * 1000:.1f})")
    print(f"  separate / fused = {med['separate'] / med['fused']:.2f}; loss {float(results['fused'][0]):.6f} "
          f"(both equal: checked)")


if __name__ == "__main__":
    main()
