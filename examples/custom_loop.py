"""Embed a compiled distiller in your own training loop: any spec, every stage, random tensors, CPU.

    python examples/custom_loop.py [--spec specs/crd_resnet18.yaml ...|all] [--steps 5] [--size 64] [--batch 8]
                                   [--samples 64] [--set KEY=VALUE ...]

Everything kdgraph's own trainer does goes through the same public API used here:
``kdgraph.load_spec(path, overrides=[...])``, ``kdgraph.compile``, ``kdgraph.data.wrap`` (the spec's
data wrapper: CRD's ``index`` and ``contrast_index``) and ``kdgraph.data.batch_kwargs``,
``trainable_parameters()``, ``distiller(**batch)`` -> ``out.loss``, ``out.terms``, ``out.logits``, and
``enter_stage`` for multi-stage specs (adapters carry over from stage to stage).
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

import kdgraph

ROOT = Path(__file__).resolve().parents[1]


class RandomImages(Dataset):
    """Stands in for your dataset: map-style, ``(image, target)`` items (a fixed random draw per index)."""

    def __init__(self, n: int, channels: int, size: int, num_classes: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, channels, size, size, generator=g)
        self.targets = torch.randint(0, num_classes, (n,), generator=g)
        self.targets[:2] = torch.tensor([0, 1]) % num_classes  # at least two classes (CRD's negatives)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], int(self.targets[i])


def make_optimizer(cfg, params):
    """The stage's optimizer from its spec (or any optimizer you like: only trainable parameters go in)."""
    if cfg.type == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    cls = torch.optim.Adam if cfg.type == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_spec(path, steps: int = 5, size: int = 64, batch: int = 8, samples: int = 64, overrides=()) -> dict:
    """Train every stage of the spec at ``path`` for ``steps`` steps; returns each stage's losses per step."""
    spec = kdgraph.load_spec(path, overrides=[f"input.size=[{size}, {size}]", *overrides])
    dataset = RandomImages(samples, spec.input.channels, size, spec.input.num_classes)
    # CRD keeps one memory row per training sample: tell its loss how many there are
    crd = [f"stages.{st.name}.losses.{ls.name}.args.num_samples={len(dataset)}"
           for st in spec.stages for ls in st.losses if ls.type == "crd"]
    spec = kdgraph.apply_overrides(spec, crd)
    distiller = kdgraph.compile(spec)                 # teacher/student built from the spec (random init)
    torch.manual_seed(0)
    losses: dict[str, list[float]] = {}
    for stage in distiller.stages:                    # one loop per stage; adapters carry over
        distiller.enter_stage(stage).train()          # the teacher stays in eval mode regardless
        # the spec's data wrapper (if any) adds the per-batch extras this stage reads
        loader = DataLoader(kdgraph.data.wrap(dataset, spec, stage=stage), batch_size=batch, shuffle=True,
                            drop_last=True)
        opt = make_optimizer(spec.stage(stage).optimizer, distiller.trainable_parameters())
        losses[stage] = []
        for step, b in zip(range(steps), itertools.cycle(loader)):
            out = distiller(**kdgraph.data.batch_kwargs(b))   # images, targets, + index, contrast_index (CRD)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            losses[stage].append(out.loss.item())
            terms = "  ".join(f"{k}={v.item():.4f}" for k, v in out.terms.items())
            print(f"{spec.name} stage {stage} step {step}: loss={out.loss.item():.4f}  {terms}")
    # the student is the plain module the spec names: save it as usual
    print(f"{spec.name}: stages trained: {', '.join(distiller.stages)}; student parameters:",
          sum(p.numel() for p in distiller.student.parameters()))
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", nargs="+", default=[str(ROOT / "specs" / "kd_resnet18.yaml")],
                    help="spec files, or 'all' for every spec under specs/")
    ap.add_argument("--steps", type=int, default=5, help="steps per stage")
    ap.add_argument("--size", type=int, default=64, help="image size (the specs' is 224)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--samples", type=int, default=64, help="size of the random dataset")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="spec overrides, as kdgraph train --set (e.g. data.wrapper.args.num_negative_samples=64)")
    args = ap.parse_args()
    paths = sorted((ROOT / "specs").rglob("*.yaml")) if args.spec == ["all"] else args.spec
    for path in paths:
        train_spec(path, args.steps, args.size, args.batch, args.samples, args.set)


if __name__ == "__main__":
    main()
