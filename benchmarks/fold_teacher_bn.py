"""What the fold_teacher_bn pass buys: a KD step (ResNet-34 teacher -> ResNet-18 student) with the teacher's
BatchNorms folded into its convolutions, against the same compiled step with the pass off.

Interleaved in one process, same weights and batches, medians of --steps timed steps after warm-up; also the
largest relative difference of the loss and of the teacher's logits between the two graphs.

    python benchmarks/fold_teacher_bn.py [--batch 32] [--size 112] [--steps 10] [--channels-last]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.models import resnet18, resnet34

import kdgraph

SPEC = {
    "name": "fold_bench", "input": {"channels": 3, "size": [112, 112], "num_classes": 1000},
    "teacher": {"model": "torchvision:resnet34"}, "student": {"model": "torchvision:resnet18"},
    "stages": [{"name": "main", "optimizer": {"lr": 0.1, "momentum": 0.9}, "losses": [
        {"name": "ce", "type": "cross_entropy", "weight": 0.5},
        {"name": "kd", "type": "kd", "weight": 0.5, "args": {"temperature": 1.0},
         "inputs": {"student": "student:@output", "teacher": "teacher:@output"}}]}],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--channels-last", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    teacher, student = resnet34().eval(), resnet18()
    spec = dict(SPEC, input=dict(SPEC["input"], size=[a.size, a.size]))
    variants = {"fold on": kdgraph.compile(dict(spec, runtime={"fold_teacher_bn": True}), teacher=teacher,
                                           student=student),
                "fold off": kdgraph.compile(dict(spec, runtime={"fold_teacher_bn": False}),
                                            teacher=teacher, student=student)}
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    for d in variants.values():
        d.train()
        d.to(memory_format=fmt)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)  # lr 0: every variant sees the same weights
    x = torch.randn(a.batch, 3, a.size, a.size).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (a.batch,))
    times: dict[str, list[float]] = {k: [] for k in variants}
    losses = {}
    for i in range(a.steps + 2):
        for name, d in variants.items():
            t0 = time.perf_counter()
            out = d(x, y)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            if i >= 2:
                times[name].append(dt)
            losses[name] = out.loss.detach()
    with torch.no_grad():
        t_on = variants["fold on"](x, y, return_taps=True).taps["teacher:@output"]
        t_off = variants["fold off"](x, y, return_taps=True).taps["teacher:@output"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"KD step, ResNet-34 -> ResNet-18, batch {a.batch} at {a.size}x{a.size}, "
          f"{'channels_last' if a.channels_last else 'contiguous'}, {torch.get_num_threads()} thread(s), "
          f"median of {a.steps} steps:")
    for k, v in med.items():
        print(f"  {k:9s} {v * 1000:8.1f} ms")
    print(f"  ratio fold on / fold off: {med['fold on'] / med['fold off']:.3f}")
    rel = lambda p, q: float(((p - q).abs().max() / q.abs().max()).item())  # noqa: E731
    print(f"  loss: {losses['fold on'].item():.6f} vs {losses['fold off'].item():.6f} "
          f"(relative difference {rel(losses['fold on'], losses['fold off']):.2e}); teacher logits: max relative "
          f"difference {rel(t_on, t_off):.2e}")


if __name__ == "__main__":
    main()
