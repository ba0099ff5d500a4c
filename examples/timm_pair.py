"""Distil between timm models: a DeiT-style ViT pair named in the spec as ``timm:NAME``, random init.

    python examples/timm_pair.py [--steps 6] [--batch 8]

``timm:NAME`` builds ``timm.create_model(NAME, pretrained=False, **kwargs)`` (``pip install 'kdgraph[timm]'``);
weights never come through timm, they come from the spec's ``weights:`` (a local file). Capture honours timm's
own fx leaf registry, so the taps use timm's module paths: ``teacher:blocks.3`` is the output of the teacher's
fourth transformer block, ``student:blocks.1`` the student's second (``kdgraph inspect`` lists every name).

The pair: a 4-block ViT-S/8 teacher and a 2-block student of the same width (384) at 32x32, so the student's
last block can be regressed onto the teacher's last block token by token (MSE, as in hidden-state distillation),
besides KD on the logits and cross-entropy on the labels.
"""
from __future__ import annotations

import argparse

import torch

import kdgraph

VIT = {"num_classes": 10, "img_size": 32, "patch_size": 8}
SPEC = {
    "name": "timm_vit_pair",
    "description": "CE + KD + last-block MSE from a 4-block to a 2-block ViT-S/8 (timm, random init)",
    "input": {"channels": 3, "size": [32, 32], "num_classes": 10},
    "teacher": {"model": "timm:vit_small_patch16_224", "kwargs": {**VIT, "depth": 4}},
    "student": {"model": "timm:vit_small_patch16_224", "kwargs": {**VIT, "depth": 2}},
    "stages": [{
        "name": "main",
        "optimizer": {"type": "adamw", "lr": 5.0e-4, "weight_decay": 0.05},
        "losses": [
            {"name": "ce", "type": "cross_entropy", "weight": 0.5},
            {"name": "kd", "type": "kd", "weight": 0.5, "args": {"temperature": 2.0},
             "inputs": {"student": "student:@output", "teacher": "teacher:@output"}},
            {"name": "hidden", "type": "mse", "weight": 1.0,
             "inputs": {"student": "student:blocks.1", "teacher": "teacher:blocks.3"}},
        ],
    }],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    torch.manual_seed(0)
    distiller = kdgraph.compile(SPEC)  # timm: names need no consent: timm builds its own registered architectures
    print(f"teacher {type(distiller.teacher).__module__}.{type(distiller.teacher).__name__}: "
          f"{sum(p.numel() for p in distiller.teacher.parameters())} parameters, "
          f"{len(distiller.teacher.blocks)} blocks")
    print(f"student {type(distiller.student).__module__}.{type(distiller.student).__name__}: "
          f"{sum(p.numel() for p in distiller.student.parameters())} parameters, "
          f"{len(distiller.student.blocks)} blocks")
    for t in distiller.report.taps:
        print(f"tap {t.tap:<18} -> node {t.node:<28} shape {list(t.shape) if t.shape else '?'}")
    print(f"teacher nodes pruned (no loss needs them): {distiller.report.teacher_nodes_pruned}")

    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    distiller.train()
    opt = torch.optim.AdamW(distiller.trainable_parameters(), lr=5e-4, weight_decay=0.05)
    images = torch.randn(args.batch, 3, 32, 32)  # one fixed batch: the loss must go down on it
    targets = torch.randint(0, 10, (args.batch,))
    losses = []
    for step in range(args.steps):
        out = distiller(images, targets)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        print(f"step {step}: loss={out.loss.item():.4f}  "
              + "  ".join(f"{k}={v.item():.4f}" for k, v in out.terms.items()))
    same = all(torch.equal(teacher_before[k], v) for k, v in distiller.teacher.state_dict().items())
    print(f"teacher unchanged: {same}")
    print(f"loss decreased: {losses[-1] < losses[0]} ({losses[0]:.4f} -> {losses[-1]:.4f})")


if __name__ == "__main__":
    main()
