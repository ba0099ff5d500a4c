"""Per-step cost of data.augment on the Fashion-MNIST KD spec: plain, mixup+cutmix, RandAugment, both.

    python benchmarks/augment_overhead.py [--spec specs/fashion_mnist/kd.yaml] [--batch 128] [--rounds 15]

One step = reading the batch through the training view (the in-memory set's seeded translation / flip, the
policy, the mixing) + the compiled distiller's forward, backward and AdamW step, on CPU. The variants run
interleaved in one process (A, B, C, D, A, B, ...) after one warm-up round, each on the same batch keys; the table
gives the median step time, the median time of the data part alone, and the overhead against the plain spec.

"No per-sample Python loop": the script also counts, for batches of 32, 128 and 512, how many times torchvision's
op (``_apply_image_or_video_transform``) runs per RandAugment batch (once per distinct (op, magnitude) drawn, so
bounded by 14 ops x 2 signs x num_ops layers whatever the batch size) and how many MixUp / CutMix calls a batch
makes (one), and times torchvision's RandAugment called image by image on the same batch for comparison.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kdgraph  # noqa: E402
from kdgraph.spec.augment import AugmentSpec  # noqa: E402
from kdgraph.train.data import SeededView, build_datasets, collate, unpack_batch  # noqa: E402
from kdgraph.train.data.augment import BatchMix, GroupedPolicy  # noqa: E402

VARIANTS = {
    "plain": None,
    "mixup+cutmix": {"mixup": {"alpha": 0.2}, "cutmix": {"alpha": 1.0}},
    "randaugment": {"randaugment": {"num_ops": 2, "magnitude": 9}},
    "randaugment+mix": {"randaugment": {"num_ops": 2, "magnitude": 9}, "mixup": {"alpha": 0.2},
                        "cutmix": {"alpha": 1.0}},
}


def view_of(spec_path: Path, aug) -> tuple[SeededView, kdgraph.Distiller]:
    spec = kdgraph.load_spec(spec_path, overrides=[])
    spec.data.augment = None if aug is None else AugmentSpec(**aug)
    bundle = build_datasets(spec)
    mix = BatchMix(spec.data.augment, 10, 0) if spec.data.augment and spec.data.augment.mixes else None
    return SeededView(bundle.train, 0, True, mix=mix), kdgraph.compile(spec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default=str(ROOT / "specs" / "fashion_mnist" / "kd.yaml"))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    runs = {}
    base = None
    for name, aug in VARIANTS.items():
        view, d = view_of(Path(args.spec), aug)
        if base is None:
            base = d
        else:
            d.load_state_dict(base.state_dict())  # the same weights for every variant
        d.train()
        opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-3)
        runs[name] = (view, d, opt, [], [], [])
    n = len(runs["plain"][0])
    for r in range(args.rounds + 1):
        keys = [(int(i), r) for i in torch.randperm(n)[: args.batch]]
        for name, (view, d, opt, step_t, data_t, cpu_t) in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            images, targets, _ = unpack_batch(collate(view.__getitems__(keys)))
            c1, t1 = time.process_time(), time.perf_counter()
            out = d(images.contiguous(memory_format=torch.channels_last), targets)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            c2, t2 = time.process_time(), time.perf_counter()
            if r > 0:  # round 0 warms up
                step_t.append((t2 - t0, c2 - c0))
                data_t.append((t1 - t0, c1 - c0))
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    plain = med(runs["plain"][3], 1)
    print(f"{args.spec}, batch {args.batch}, {args.rounds} interleaved rounds, torch threads "
          f"{torch.get_num_threads()}; medians; CPU = this process's CPU time (steadier than wall time on a "
          f"shared machine), overhead on CPU time")
    print(f"{'variant':18} {'step wall ms':>13} {'step CPU ms':>12} {'data CPU ms':>12} {'overhead':>9}")
    for name, (_, _, _, step_t, data_t, _) in runs.items():
        print(f"{name:18} {med(step_t, 0) * 1e3:13.1f} {med(step_t, 1) * 1e3:12.1f} {med(data_t, 1) * 1e3:12.1f} "
              f"{100 * (med(step_t, 1) - plain) / plain:8.1f}%")

    # per-sample loops: torchvision op calls per batch, vs the batch size
    from torchvision.transforms import v2

    images = runs["plain"][0].dataset.images
    pol = GroupedPolicy(AugmentSpec(randaugment={"num_ops": 2, "magnitude": 9}))
    calls = {"n": 0}
    apply = pol.tv._apply_image_or_video_transform

    def counted(*a, **k):
        calls["n"] += 1
        return apply(*a, **k)

    pol.tv._apply_image_or_video_transform = counted
    print("\nRandAugment(2, 9) on uint8 batches: torchvision op calls per batch, grouped vs image by image")
    print(f"{'batch':>6} {'op calls':>9} {'grouped CPU ms':>15} {'per-image CPU ms':>17}")
    per_image = v2.RandAugment(2, 9)
    for b in (32, 128, 512):
        x = images[:b].unsqueeze(1)
        seeds = torch.randint(0, 2 ** 62, (b,))
        calls["n"] = 0
        t0 = time.process_time()
        pol(x, seeds)
        t1 = time.process_time()
        op_calls = calls["n"]
        t2 = time.process_time()
        torch.stack([per_image(x[i]) for i in range(b)])
        t3 = time.process_time()
        print(f"{b:6d} {op_calls:9d} {(t1 - t0) * 1e3:15.1f} {(t3 - t2) * 1e3:17.1f}")
    mix = BatchMix(AugmentSpec(mixup={"alpha": 0.2}, cutmix={"alpha": 1.0}), 10, 0)
    n_calls = {"n": 0}
    for t in mix.tf.transforms:
        fwd = t.forward

        def wrapped(*a, _f=fwd, **k):
            n_calls["n"] += 1
            return _f(*a, **k)

        t.forward = wrapped
    from kdgraph.data import Batch

    mix(Batch(torch.randn(512, 1, 28, 28), torch.randint(0, 10, (512,))), (0, 0))
    print(f"MixUp/CutMix calls for one batch of 512: {n_calls['n']}")


if __name__ == "__main__":
    main()
