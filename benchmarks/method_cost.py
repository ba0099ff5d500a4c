"""Step time of each distillation method on its Fashion-MNIST spec, relative to KD: what a method costs.

    python benchmarks/method_cost.py [--specs kd dkd nkd ...] [--batch 128] [--steps 10] [--rounds 3]

Each spec of ``specs/fashion_mnist/`` is compiled as the trainer would (its networks at 28x28, randomly initialised:
step time does not depend on the weights), and one training step (forward of the fused graph, backward, the
stage's optimizer step; ``sgd_dot`` through ``step_terms``) is timed on a fixed random batch, channels_last, fp32,
in this process. Specs are measured round-robin (``--rounds`` passes of ``--steps`` steps each, after 3 warm-up
steps) and the median per spec is reported with its ratio to KD's. Multi-stage specs time their last stage.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import kdgraph
from kdgraph.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def _setup(name: str, batch: int):
    spec = kdgraph.load_spec(ROOT / "specs" / "fashion_mnist" / f"{name}.yaml")
    d = kdgraph.compile(spec, stage=len(spec.stages) - 1).train()
    d = d.to(memory_format=torch.channels_last)
    d.progress.update(epoch=1, step=0, steps_per_epoch=40, epochs=spec.stages[-1].epochs)
    opt = build_optimizer(spec.stages[-1], d.trainable_parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=g)
    extra = {}
    for key in d.batch_inputs:  # CRD's sample indices
        extra[key] = torch.randint(0, 5000, (batch,), generator=g)

    def step() -> None:
        out = d(x, y, **extra)
        if hasattr(opt, "step_terms"):
            opt.step_terms(out.terms, d.task_terms())
        else:
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", nargs="+", default=["kd", "dkd", "nkd", "ttm", "wttm", "nst", "kdsvd", "ofd", "ctkd",
                                                  "dot"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    steps = {n: _setup(n, a.batch) for n in a.specs}
    times: dict[str, list[float]] = {n: [] for n in a.specs}
    for fn in steps.values():
        for _ in range(3):
            fn()
    for _ in range(a.rounds):
        for n, fn in steps.items():
            for _ in range(a.steps):
                t0 = time.perf_counter()
                fn()
                times[n].append(time.perf_counter() - t0)
    ref = statistics.median(times["kd"]) if "kd" in times else None
    print(f"| spec | step (ms, median of {a.rounds * a.steps}) | ms / image | vs KD |")
    print("|---|---|---|---|")
    for n, ts in times.items():
        m = statistics.median(ts)
        print(f"| {n} | {m * 1e3:.1f} | {m * 1e3 / a.batch:.2f} | {m / ref:.2f} |" if ref else f"| {n} | {m * 1e3:.1f} | |")


if __name__ == "__main__":
    main()
