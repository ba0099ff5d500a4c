"""Step-time overhead of gradient clipping and the student's EMA on the Fashion-MNIST KD spec's training step.

    python benchmarks/recipe_overhead.py [--spec specs/fashion_mnist/kd.yaml] [--steps 40] [--warmup 5]
                                         [--device cpu|cuda] [--threads 1]

One distiller, one optimizer; four variants of kdgraph's own optimizer step (:func:`kdgraph.train.steps.
optimizer_step`) run interleaved in one process (plain, clip, ema, clip + ema, plain, ...) on the spec's batch size:
forward, backward, then the step with clip_grad {max_norm: 1.0} and/or ema {decay: 0.999}. Prints each
variant's median step time and its overhead over the plain step, and the same as JSON (``--json``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kdgraph  # noqa: E402
from kdgraph.spec.recipe import ClipSpec, EmaSpec  # noqa: E402
from kdgraph.train.ema import StudentEMA  # noqa: E402
from kdgraph.train.optim import build_optimizer, lr_used  # noqa: E402
from kdgraph.train.steps import StageRun, optimizer_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default=str(ROOT / "specs" / "fashion_mnist" / "kd.yaml"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = kdgraph.load_spec(args.spec)
    st = spec.stages[0]
    dev = torch.device(args.device)
    d = kdgraph.compile(spec).to(dev)
    try:
        d.load_weights()  # the cached teacher when present (timing does not depend on it)
    except kdgraph.errors.KDGraphError:
        pass
    cl = spec.runtime.channels_last
    if cl:
        d = d.to(memory_format=torch.channels_last)
    d.train()
    opt = build_optimizer(st, d.trainable_parameters(), lr_used(st, 1), d)
    c, (h, w) = spec.input.channels, spec.input.size
    x = torch.randn(st.batch_size, c, h, w, device=dev)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.input.num_classes, (st.batch_size,), device=dev)
    clip = ClipSpec(max_norm=1.0)
    ema = StudentEMA(d.student, EmaSpec(decay=0.999))
    variants = {"plain": (None, None), "clip": (clip, None), "ema": (None, ema), "clip+ema": (clip, ema)}
    runs = {name: StageRun("main", 0, SimpleNamespace(clip_grad=c_, scheduler=None), d, d, None, None, opt, None,
                           None, 0.0, [], False, "never", ema=e_, student=d.student)
            for name, (c_, e_) in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for i in range(args.warmup + args.steps):
        for name, run in runs.items():
            sync()
            t0 = time.perf_counter()
            d(x, y).loss.backward()
            optimizer_step(run)
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"spec": spec.name, "batch": st.batch_size, "device": str(dev), "threads": args.threads,
           "steps": args.steps, "median_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
           "overhead_pct": {k: round(100 * (v / med["plain"] - 1), 2) for k, v in med.items() if k != "plain"}}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{spec.name}: batch {st.batch_size}, {dev}, {args.threads} thread(s), median of {args.steps} interleaved "
          f"steps each")
    for k, v in med.items():
        extra = "" if k == "plain" else f"  ({out['overhead_pct'][k]:+.2f}%)"
        print(f"  {k:9s} {v * 1e3:8.2f} ms{extra}")


if __name__ == "__main__":
    main()
