"""Embed a compiled distiller in your own training loop (plain SGD, random tensors, CPU).

    python examples/custom_loop.py [--steps 5] [--size 64] [--spec specs/kd_resnet18.yaml]

Everything kdgraph's own trainer does goes through the same public API used here:
``kdgraph.compile``, ``trainable_parameters()``, ``distiller(images, targets)`` -> ``out.loss``,
``out.terms``, ``out.logits``, and ``enter_stage`` for multi-stage specs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import kdgraph

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "specs" / "kd_resnet18.yaml"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--size", type=int, default=64, help="image size (the spec's is 224)")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    spec = kdgraph.load_spec(args.spec)
    spec.input.size = (args.size, args.size)          # shapes (and inferred adapter args) follow
    distiller = kdgraph.compile(spec)                 # teacher/student built from the spec (random init)
    torch.manual_seed(0)
    n_classes = spec.input.num_classes
    for stage in distiller.stages:                    # one loop per stage; adapters carry over
        distiller.enter_stage(stage).train()          # the teacher stays in eval mode regardless
        cfg = spec.stage(stage).optimizer
        opt = torch.optim.SGD(distiller.trainable_parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        for step in range(args.steps):
            images = torch.randn(args.batch, spec.input.channels, args.size, args.size)
            targets = torch.randint(0, n_classes, (args.batch,))
            out = distiller(images, targets)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            terms = "  ".join(f"{k}={v.item():.4f}" for k, v in out.terms.items())
            print(f"stage {stage} step {step}: loss={out.loss.item():.4f}  {terms}")
    # the student is the plain torchvision module: save it as usual
    print("student parameters:", sum(p.numel() for p in distiller.student.parameters()))


if __name__ == "__main__":
    main()
