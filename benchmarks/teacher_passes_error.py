"""How far the teacher passes move the numbers: for each combination of fold_teacher_bn, teacher_channels_last and
teacher_dtype, and for teacher_mkldnn (alone: the spec refuses it with the others), the teacher's logits and
layer4 features and the KD / AT loss terms against the plain fp32 graph.

ResNet-34 teacher -> ResNet-18 student, random init with non-trivial BatchNorm statistics (no weights are
downloaded), one batch of --batch images at --size x --size, no update.

    python benchmarks/teacher_passes_error.py [--batch 32] [--size 112] [--dtypes bf16]
"""
from __future__ import annotations

import argparse
import itertools

import torch
from torch import nn
from torchvision.models import resnet18, resnet34

import kdgraph

SPEC = {
    "name": "tpasses_error", "input": {"channels": 3, "size": [112, 112], "num_classes": 1000},
    "teacher": {"model": "torchvision:resnet34"}, "student": {"model": "torchvision:resnet18"},
    "stages": [{"name": "main", "optimizer": {"lr": 0.1}, "losses": [
        {"name": "kd", "type": "kd", "args": {"temperature": 4.0},
         "inputs": {"student": "student:@output", "teacher": "teacher:@output"}},
        {"name": "at", "type": "at", "inputs": {"student": "student:layer4", "teacher": "teacher:layer4"}}]}],
}


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--dtypes", nargs="*", default=["bf16"], help="teacher dtypes besides fp32")
    a = ap.parse_args()
    torch.manual_seed(0)
    teacher, student = randomise_bn(resnet34()).eval(), resnet18()
    spec = dict(SPEC, input=dict(SPEC["input"], size=[a.size, a.size]))
    x, y = torch.randn(a.batch, 3, a.size, a.size), torch.randint(0, 1000, (a.batch,))

    def run(**rt):
        d = kdgraph.compile(dict(spec, runtime=rt), teacher=teacher, student=student)
        d.train()
        with torch.no_grad():
            return d(x, y, return_taps=True)

    ref = run()
    print(f"ResNet-34 -> ResNet-18, batch {a.batch} at {a.size}x{a.size}; errors against the plain fp32 graph "
          f"(rel = max |a - b| / max |b|)")
    print("| pass(es) | logits max abs | logits max rel | layer4 max rel | KD loss rel | AT loss rel |")
    print("|---|---|---|---|---|---|")
    combos = [dict(fold_teacher_bn=fold, teacher_channels_last=cl, teacher_dtype=dt)
              for fold, cl, dt in itertools.product((False, True), (False, True), ["fp32", *a.dtypes])
              if fold or cl or dt != "fp32"] + [dict(teacher_mkldnn=True)]
    for rt in combos:
        out = run(**rt)
        t, r = out.taps["teacher:@output"], ref.taps["teacher:@output"]
        f, rf = out.taps["teacher:layer4"], ref.taps["teacher:layer4"]
        rel = lambda p, q: float((p - q).abs().max() / q.abs().max())  # noqa: E731
        name = " + ".join(k if v is True else f"{k}: {v}" for k, v in rt.items() if v not in (False, "fp32")) \
            or "none"
        print(f"| {name} | {float((t - r).abs().max()):.2e} "
              f"| {rel(t, r):.2e} | {rel(f, rf):.2e} | {rel(out.terms['kd'], ref.terms['kd']):.2e} "
              f"| {rel(out.terms['at'], ref.terms['at']):.2e} |", flush=True)


if __name__ == "__main__":
    main()
