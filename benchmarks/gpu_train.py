"""Training throughput of the ImageNet KD and FT specs on one GPU: images/s, eager vs torch.compile.

Synthetic 224x224 batches already on the GPU (so the number is the distiller's, not the data
loader's), amp bf16 and channels_last as ``runtime`` would set them, batch = the spec's per-GPU
batch (256), SGD on ``distiller.trainable_parameters()`` exactly as ``kdgraph train`` builds it.
Each configuration: warm-up steps (including compilation, timed separately), then timed steps,
synchronised per step; the median step gives images/s. Runs in under 4 minutes on one H100::

    python benchmarks/gpu_train.py                      # all four: {kd, ft} x {eager, compiled}
    python benchmarks/gpu_train.py --smoke              # CPU, 64x64, batch 4: checks the script runs

One JSON line per configuration on stdout (and in $OUT/gpu_train.jsonl when OUT is set), then a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kdgraph  # noqa: E402

CONFIGS = [  # (spec, stage): FT's long stage is "main" (student + translator, paraphraser encoder frozen)
    ("kd", "specs/kd_resnet18.yaml", "main"),
    ("ft", "specs/ft_resnet18.yaml", "main"),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, spec_path: str, stage: str, compiled: bool, args, device: torch.device) -> dict:
    spec = kdgraph.load_spec(ROOT / spec_path)
    spec.input.size = (args.size, args.size)
    st = spec.stage(stage)
    batch = args.batch or st.batch_size
    torch.manual_seed(0)
    d = kdgraph.compile(spec, stage=stage).to(device)
    if args.channels_last:
        d = d.to(memory_format=torch.channels_last)
    if compiled:
        d.use_torch_compile(True)
    d.train()
    opt = torch.optim.SGD(d.trainable_parameters(), lr=st.optimizer.lr, momentum=st.optimizer.momentum,
                          weight_decay=st.optimizer.weight_decay)
    x = torch.randn(batch, spec.input.channels, args.size, args.size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.input.num_classes, (batch,), device=device)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    def step() -> float:
        with amp:
            out = d(x, y)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync(device)
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    res = {"config": name, "spec": spec_path, "stage": stage, "compiled": compiled, "batch": batch,
           "size": args.size, "amp": args.amp, "channels_last": args.channels_last,
           "images_per_s": round(batch / med, 1), "step_ms_median": round(med * 1000, 2),
           "step_ms_min": round(min(times) * 1000, 2), "warmup_s": round(warm_s, 1), "loss": float(loss),
           "trainable_parameters": sum(p.numel() for p in d.trainable_parameters()),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    del d, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, 64x64, batch 4, 2 steps (a check that the script runs)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=0, help="default: the spec's per-GPU batch (256)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--amp", choices=["bf16", "off"], default="bf16")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--only", choices=["kd", "ft"], default=None)
    ap.add_argument("--eager-only", action="store_true")
    ap.add_argument("--budget-s", type=float, default=220.0, help="skip configurations that would start after this")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.batch, args.steps, args.warmup, args.amp = 64, 4, 2, 1, "off"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out_dir = os.environ.get("OUT")
    sink = open(Path(out_dir) / "gpu_train.jsonl", "a") if out_dir else None
    t_start = time.perf_counter()
    results = []
    plan = [(n, p, s, c) for c in ([False] if args.eager_only else [False, True]) for n, p, s in CONFIGS
            if args.only in (None, n)]
    for name, path, stage, compiled in plan:
        if time.perf_counter() - t_start > args.budget_s:
            print(json.dumps({"config": name, "compiled": compiled, "skipped": "time budget"}), flush=True)
            continue
        try:
            r = bench(name, path, stage, compiled, args, device)
        except Exception as e:  # noqa: BLE001 - report and go on with the other configurations
            r = {"config": name, "compiled": compiled, "error": f"{type(e).__name__}: {e}"[:500]}
        results.append(r)
        line = json.dumps(r)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()
    print(f"\n{'config':6} {'mode':9} {'images/s':>10} {'step ms':>9} {'warm-up s':>10}  ({device}, "
          f"{args.size}x{args.size}, amp {args.amp}, channels_last {args.channels_last})")
    for r in results:
        if "images_per_s" in r:
            print(f"{r['config']:6} {'compiled' if r['compiled'] else 'eager':9} {r['images_per_s']:>10} "
                  f"{r['step_ms_median']:>9} {r['warmup_s']:>10}")
        else:
            print(f"{r['config']:6} {'compiled' if r['compiled'] else 'eager':9} {r.get('error', '')}")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
