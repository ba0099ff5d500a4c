"""Per-image cost of the kdgraph.zoo networks the Fashion-MNIST specs use (hand-written steps, no kdgraph graph).

    python benchmarks/zoo_cost.py                    # width 16, stem s2 (the specs' choice)
    python benchmarks/zoo_cost.py --widths 16,32,64 --stems s2,imagenet

Prints the median over --steps timed steps (after 2 warm-up steps) of: teacher (ResNet-34) training step,
KD step (teacher forward under no_grad + student forward/backward/step), student-only step, teacher forward,
each in ms per image, fp32 channels_last, batch --batch. Run it on a quiet machine: timings are noisy.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from kdgraph.models.zoo import resnet18_small, resnet34_small


def median_ms(fn, steps: int, batch: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / batch * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="16")
    ap.add_argument("--stems", default="s2")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(a.batch, 1, 28, 28).contiguous(memory_format=cl)
    y = torch.randint(0, 10, (a.batch,))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch}; ms / image")
    for stem in a.stems.split(","):
        for w in map(int, a.widths.split(",")):
            t = resnet34_small(stem=stem, width=w).to(memory_format=cl)
            s = resnet18_small(stem=stem, width=w).to(memory_format=cl)
            ot, os_ = torch.optim.AdamW(t.parameters(), 1e-3), torch.optim.AdamW(s.parameters(), 1e-3)

            def teacher_step():
                t.train()
                loss = F.cross_entropy(t(x), y)
                ot.zero_grad()
                loss.backward()
                ot.step()

            def kd_step():
                t.eval()
                with torch.no_grad():
                    zt = t(x)
                zs = s(x)
                loss = F.cross_entropy(zs, y) + F.kl_div(zs.log_softmax(1), zt.log_softmax(1), log_target=True,
                                                         reduction="batchmean")
                os_.zero_grad()
                loss.backward()
                os_.step()

            def student_step():
                loss = F.cross_entropy(s(x), y)
                os_.zero_grad()
                loss.backward()
                os_.step()

            def teacher_forward():
                t.eval()
                with torch.no_grad():
                    t(x)

            row = {name: median_ms(fn, a.steps, a.batch) for name, fn in
                   [("teacher step", teacher_step), ("KD step", kd_step), ("student step", student_step),
                    ("teacher forward", teacher_forward)]}
            print(f"stem {stem:8s} width {w:3d}  " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
