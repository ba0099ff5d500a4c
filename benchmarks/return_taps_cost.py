"""What ``return_taps`` costs: one training step (forward, backward, SGD step) three ways, interleaved in one process.

    python benchmarks/return_taps_cost.py [--spec ft] [--stage -1] [--batch 16] [--size 64] [--rounds 30]
                                          [--before 08a0e16]

- ``before``: the Distiller class of commit ``--before`` (kdgraph/distiller.py as it was before
  ``return_taps`` existed, read with ``git show`` and run against today's compiler);
- ``off``: today's Distiller, ``distiller(images, targets)``;
- ``on``: today's Distiller, ``distiller(images, targets, return_taps=True)``.

All three wrap the same teacher and student modules (the same weights) and run interleaved after
warm-up, the order rotated every round (A B C, B C A, C A B, ...) so no variant always runs first; the table reports each median step time and the ratios off/before and on/off.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kdgraph  # noqa: E402
from kdgraph.distiller import Distiller  # noqa: E402


def distiller_class_at(rev: str) -> type:
    """The Distiller class of kdgraph/distiller.py at git revision ``rev``, as a module of the kdgraph package."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:kdgraph/distiller.py"], capture_output=True,
                         text=True, check=True).stdout
    mod = types.ModuleType("kdgraph._distiller_before")
    mod.__package__ = "kdgraph"
    exec(compile(src, f"{rev}:kdgraph/distiller.py", "exec"), mod.__dict__)  # noqa: S102 - our own history
    return mod.Distiller


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="ft", help="specs/<spec>_resnet18.yaml")
    ap.add_argument("--stage", type=int, default=-1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--before", default="08a0e16", help="a commit without return_taps")
    args = ap.parse_args()

    torch.manual_seed(0)
    spec = kdgraph.load_spec(ROOT / "specs" / f"{args.spec}_resnet18.yaml",
                             overrides=[f"input.size=[{args.size}, {args.size}]"])
    today = Distiller.from_spec(spec, stage=args.stage).train()
    before = distiller_class_at(args.before)(spec, today.teacher, today.student, stage=args.stage).train()
    before.adapters.load_state_dict(today.adapters.state_dict())
    n = spec.input.num_classes
    images = torch.randn(args.batch, spec.input.channels, args.size, args.size)
    targets = torch.randint(0, n, (args.batch,))
    variants = {
        "before": (before, {}),
        "off": (today, {}),
        "on": (today, {"return_taps": True}),
    }
    opts = {k: torch.optim.SGD(d.trainable_parameters(), lr=0.0) for k, (d, _) in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.warmup + args.rounds):
        names = list(variants)
        for name in names[r % 3:] + names[:r % 3]:
            d, kw = variants[name]
            t0 = time.perf_counter()
            out = d(images, targets, **kw)
            opts[name].zero_grad(set_to_none=True)
            out.loss.backward()
            opts[name].step()
            dt = time.perf_counter() - t0
            del out  # the taps keep activations alive: release them before the next variant runs
            if r >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"spec {args.spec}_resnet18 stage {today.stage}, batch {args.batch} x {args.size}x{args.size}, "
          f"{args.rounds} interleaved rounds, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for k, v in med.items():
        print(f"  {k:7s} median step {v * 1000:8.1f} ms")
    print(f"  off / before = {med['off'] / med['before']:.3f}    on / off = {med['on'] / med['off']:.3f}")
    print(f"  taps returned: {len(today(images, targets, return_taps=True).taps)}")


if __name__ == "__main__":
    main()
