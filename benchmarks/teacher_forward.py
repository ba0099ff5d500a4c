"""The frozen teacher's forward alone, in each form the teacher passes give it: which pass pays depends on the CPU.

ResNet-34 at random init (eval, no grad), batch --batch at --size x --size, fp32 input; variants interleaved in
one process (A, B, C, ... per round), medians of --steps rounds after warm-up:

- ``eager``: the module as a hand-written loop calls it;
- ``channels_last``: module and input in channels_last (``teacher_channels_last``);
- ``bf16`` / ``bf16 + channels_last``: under CPU autocast (``teacher_dtype: bf16``);
- ``folded``: BatchNorm folded into the convolutions (``fold_teacher_bn``; torch.fx's ``fuse`` here);
- ``oneDNN subgraph``: kdgraph's ``teacher_mkldnn`` call, taken from a compiled distiller.

    python benchmarks/teacher_forward.py [--batch 32] [--size 112] [--steps 10]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.models import resnet18, resnet34

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kdgraph  # noqa: E402
from kdgraph.compiler.passes.teacher_mkldnn import HOLDER  # noqa: E402

SPEC = {"name": "teacher_forward", "input": {"channels": 3, "size": [112, 112], "num_classes": 1000},
        "teacher": {"model": "torchvision:resnet34"}, "student": {"model": "torchvision:resnet18"},
        "stages": [{"name": "main", "optimizer": {"lr": 0.1}, "losses": [{"type": "kd"}]}],
        "runtime": {"teacher_mkldnn": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    from torch.fx.experimental.optimization import fuse

    torch.manual_seed(0)
    teacher = resnet34().eval()
    x = torch.randn(a.batch, 3, a.size, a.size)
    cl_teacher = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    folded = fuse(teacher)
    spec = dict(SPEC, input=dict(SPEC["input"], size=[a.size, a.size]))
    d = kdgraph.compile(spec, teacher=teacher, student=resnet18())
    onednn = d.graph_module.get_submodule(HOLDER)

    def bf16(fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn()
        return run

    variants = {
        "eager": lambda: teacher(x),
        "channels_last": lambda: cl_teacher(x_cl),
        "bf16": bf16(lambda: teacher(x)),
        "bf16 + channels_last": bf16(lambda: cl_teacher(x_cl)),
        "folded": lambda: folded(x),
        "oneDNN subgraph": lambda: onednn(x),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        ref = teacher(x)
        err = float((onednn(x)[0] - ref).abs().max() / ref.abs().max())
        for r in range(a.warmup + a.steps):
            for k, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                if r >= a.warmup:
                    times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["eager"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ResNet-34 forward, batch {a.batch} at "
          f"{a.size}x{a.size}, medians of {a.steps} interleaved rounds; oneDNN logits max rel diff {err:.1e}")
    print("| teacher | ms | vs eager |")
    print("|---|---|---|")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"| {k} | {1e3 * m:.1f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
