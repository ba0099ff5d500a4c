"""Training throughput of the ImageNet KD and FT specs on one GPU: images/s and peak memory, eager vs torch.compile,
with and without the teacher passes, and (KD) with the teacher output cache.

Synthetic 224x224 batches already on the GPU (so the number is the distiller's, not the data loader's), amp bf16
and channels_last as ``runtime`` would set them, batch = the spec's per-GPU batch (256), SGD on
``distiller.trainable_parameters()`` exactly as ``kdgraph train`` builds it. The configurations, in the order
they run (the time budget skips the last ones first)::

    kd eager             ft eager              the fused graph, no torch.compile
    kd compiled          ft compiled           the same graph through torch.compile (``runtime.compile: true``)
    kd compiled+cache    ft compiled+cache     runtime.teacher_cache: teacher:@output is the batch input
                                               "teacher_output" and the teacher is pruned from the graph.
                                               FT: a row "n/a" (it reads teacher features, which are never cached)
    kd compiled+passes   ft compiled+passes    runtime.fold_teacher_bn + teacher_channels_last + teacher_dtype bf16

The teacher passes are all valid together (docs/training.md, "Teacher passes"). Under this benchmark's amp bf16
and channels_last the teacher already runs in bf16 autocast and NHWC, so ``teacher_channels_last`` and
``teacher_dtype: bf16`` change little here (the teacher's tapped values are cast back to fp32, one copy each);
``fold_teacher_bn`` removes the teacher's 36 BatchNorms.

The cache row compiles the spec with ``runtime.teacher_cache`` set, which is how ``kdgraph train`` builds a cached
stage: the compiler reads only that field (``kdgraph.compiler.cached.cached_taps``); the cache's files are
opened and checked by the training loop, not by the compiler, so none is written here. The batch carries what
the replay gives the step: the stored float16 logits as float32, shape (batch, num_classes); here random logits
rounded to float16 (the values do not change the step's cost). Reading the cache from disk is not timed, as
loading the images is not.

Each configuration: warm-up steps (the first includes torch.compile's compilation; its wall time minus the median
step is reported as compile s), then timed steps, synchronised per step; the median step gives images/s. Peak
memory: ``torch.cuda.max_memory_allocated`` over the timed steps, the peak statistics reset after warm-up (so it
is the steady training step: weights, optimizer state and the step's activations; compilation excluded), and over
the whole configuration (build, compile, warm-up) as ``peak_mem_all_gib``. On the CPU both are null: there is no
CUDA allocator, and the process's max RSS only grows from one configuration to the next, so it is not per
configuration. For compiled rows, dynamo's graph count and graph breaks are recorded (a pass that breaks the
graph shows here).

    python benchmarks/gpu_train.py                      # all of the above; ~3.5 minutes on one H100 (compiling)
    python benchmarks/gpu_train.py --smoke              # CPU, 64x64, batch 4, amp off: checks the script runs

One JSON line per configuration on stdout (and in $OUT/gpu_train.jsonl when OUT is set), then a table.
"""
from __future__ import annotations

import argparse
import gc
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
from kdgraph.compiler.cached import TEACHER_OUTPUT_KEY  # noqa: E402

SPECS = {  # name -> (spec, stage): FT's long stage is "main" (student + translator, paraphraser encoder frozen)
    "kd": ("specs/kd_resnet18.yaml", "main"),
    "ft": ("specs/ft_resnet18.yaml", "main"),
}
#: mode -> (torch.compile, teacher passes, teacher cache)
MODES = {
    "eager": (False, False, False),
    "compiled": (True, False, False),
    "compiled+cache": (True, False, True),
    "compiled+passes": (True, True, False),
}
#: the order the configurations run in: the cheap eager rows first, then the most informative compiled ones
PLAN = [("kd", "eager"), ("ft", "eager"), ("kd", "compiled"), ("ft", "compiled"), ("kd", "compiled+cache"),
        ("ft", "compiled+cache"), ("kd", "compiled+passes"), ("ft", "compiled+passes")]
PASSES = {"fold_teacher_bn": True, "teacher_channels_last": True, "teacher_dtype": "bf16"}
CACHE_DIR = "/nonexistent/gpu_train-teacher-cache"  # read by no one: the compiler only checks the field is set


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_spec(name: str, mode: str, size: int, amp: str = "bf16", channels_last: bool = True):
    """The spec with this configuration's ``runtime`` fields, as ``kdgraph train --set runtime.X=...`` would."""
    path, stage = SPECS[name]
    compiled, passes, cache = MODES[mode]
    spec = kdgraph.load_spec(ROOT / path)
    spec.input.size = (size, size)
    spec.runtime.compile, spec.runtime.amp, spec.runtime.channels_last = compiled, amp, channels_last
    if passes:
        for k, v in PASSES.items():
            setattr(spec.runtime, k, v)
    if cache:
        spec.runtime.teacher_cache = CACHE_DIR
    return spec, stage


def cache_not_applicable(name: str, mode: str, size: int) -> str | None:
    """Why a cache row cannot run (the stage reads no cached tap), from the compiled stage itself; else None."""
    if not MODES[mode][2]:
        return None
    spec, stage = make_spec(name, mode, size)
    d = kdgraph.compile(spec, stage=stage)
    if TEACHER_OUTPUT_KEY in d.batch_inputs:
        return None
    online = sorted({t.tap for t in d.report.taps if t.tap.startswith("teacher:")})
    return (f"n/a: {name.upper()} reads teacher features ({', '.join(online)}); only teacher:@output (logits) "
            f"can be cached, so the teacher stays online")


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "graph_break_reasons": sorted(counters["graph_break"])[:5]}


def bench(name: str, mode: str, args, device: torch.device) -> dict:
    compiled, passes, cache = MODES[mode]
    spec, stage = make_spec(name, mode, args.size, args.amp, args.channels_last)
    st = spec.stage(stage)
    batch = args.batch or st.batch_size
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if compiled:
        torch._dynamo.reset()
        from torch._dynamo.utils import counters
        counters.clear()
    torch.manual_seed(0)
    d = kdgraph.compile(spec, stage=stage).to(device)
    if spec.runtime.channels_last:  # as kdgraph.train.networks.build_distiller
        d = d.to(memory_format=torch.channels_last)
    if spec.runtime.compile:
        d.use_torch_compile(True)
    d.train()
    opt = torch.optim.SGD(d.trainable_parameters(), lr=st.optimizer.lr, momentum=st.optimizer.momentum,
                          weight_decay=st.optimizer.weight_decay)
    x = torch.randn(batch, spec.input.channels, args.size, args.size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.input.num_classes, (batch,), device=device)
    extras = {}
    if cache:
        assert d.batch_inputs == [TEACHER_OUTPUT_KEY] and not d.report.uses_teacher, (d.batch_inputs, d.report)
        # what the replay gives the step: float16 logits from the cache, as float32 (batch x num_classes)
        extras[TEACHER_OUTPUT_KEY] = (4 * torch.randn(batch, spec.input.num_classes, device=device)).half().float()
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=spec.runtime.amp == "bf16")

    def step() -> torch.Tensor:
        with amp:
            out = d(x, y, **extras)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    t0 = time.perf_counter()
    loss = step()
    sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        loss = step()
    sync(device)
    warm_s = time.perf_counter() - t0
    peak_all = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        peak_all = max(peak_all, peak)
    gib = (lambda b: round(b / 2 ** 30, 2) if b is not None else None)
    changed = {p.name: p.summary for p in d.report.passes if p.changed and p.name in PASSES}
    res = {"config": name, "mode": mode, "spec": SPECS[name][0], "stage": stage, "compiled": compiled,
           "teacher_passes": changed if passes else {}, "teacher_cache": cache, "batch": batch,
           "size": args.size, "amp": args.amp, "channels_last": args.channels_last,
           "images_per_s": round(batch / med, 1), "step_ms_median": round(med * 1000, 2),
           "step_ms_min": round(min(times) * 1000, 2), "timed_steps": args.steps,
           "first_step_s": round(first_s, 2), "compile_s": round(max(first_s - med, 0.0), 1) if compiled else None,
           "warmup_s": round(warm_s, 1), "loss": float(loss),
           "peak_mem_gib": gib(peak) if device.type == "cuda" else None, "peak_mem_all_gib": gib(peak_all),
           "trainable_parameters": sum(p.numel() for p in d.trainable_parameters()),
           "teacher_nodes": d.report.teacher_nodes, "batch_inputs": list(d.batch_inputs),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if compiled:
        res.update(dynamo_counts())
    del d, opt, x, y, extras
    return res


def table(results: list[dict], device, args) -> str:
    mem = "peak GiB" if device.type == "cuda" else "peak GiB*"
    lines = [f"{'config':6} {'mode':16} {'images/s':>9} {'step ms':>8} {mem:>9} {'compile s':>9} {'graphs':>6} "
             f"{'breaks':>6}  ({device}, batch {args.batch or 'spec'}, {args.size}x{args.size}, amp {args.amp}, "
             f"channels_last {args.channels_last}, median of {args.steps} steps)"]
    for r in results:
        head = f"{r['config']:6} {r['mode']:16}"
        if "images_per_s" in r:
            na = (lambda v: "-" if v is None else v)
            lines.append(f"{head} {r['images_per_s']:>9} {r['step_ms_median']:>8} {na(r['peak_mem_gib']):>9} "
                         f"{na(r['compile_s']):>9} {na(r.get('graphs')):>6} {na(r.get('graph_breaks')):>6}")
        else:
            lines.append(f"{head} {r.get('not_applicable') or r.get('skipped') or r.get('error', '')}")
    if device.type != "cuda":
        lines.append("* peak GiB: null (-) on the CPU: no CUDA allocator, and max RSS is per process, not per row")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, 64x64, batch 4, amp off, 2 steps (a check that the "
                                                         "script runs every configuration)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=0, help="default: the spec's per-GPU batch (256)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    ap.add_argument("--amp", choices=["bf16", "off"], default="bf16")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--only", choices=sorted(SPECS), default=None)
    ap.add_argument("--modes", nargs="*", choices=list(MODES), default=list(MODES), help="default: all")
    ap.add_argument("--eager-only", action="store_true", help="same as --modes eager")
    ap.add_argument("--budget-s", type=float, default=280.0,
                    help="a configuration starts only if it is expected to end within this many seconds of the "
                         "start (expected: the longest finished one of its kind, eager or compiled); the rest are "
                         "reported as skipped")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.batch, args.steps, args.warmup, args.amp = 64, 4, 2, 2, "off"
    if args.eager_only:
        args.modes = ["eager"]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out_dir = os.environ.get("OUT")
    sink = open(Path(out_dir) / "gpu_train.jsonl", "a") if out_dir else None
    t_start = time.perf_counter()
    results: list[dict] = []
    took: dict[bool, float] = {}  # compiled? -> the longest configuration of that kind so far, seconds
    plan = [(n, m) for n, m in PLAN if args.only in (None, n) and m in args.modes]
    for name, mode in plan:
        compiled = MODES[mode][0]
        elapsed = time.perf_counter() - t_start
        try:
            why = cache_not_applicable(name, mode, args.size)
        except Exception as e:  # noqa: BLE001 - report and go on with the other configurations
            why = f"error: {type(e).__name__}: {e}"[:500]
        if why:
            key = "error" if why.startswith("error: ") else "not_applicable"
            r = {"config": name, "mode": mode, key: why}
        elif elapsed + took.get(compiled, 0.0) > args.budget_s:
            r = {"config": name, "mode": mode, "skipped": f"time budget ({elapsed:.0f} s of {args.budget_s:.0f} s "
                                                          f"spent, this kind takes ~{took.get(compiled, 0):.0f} s)"}
        else:
            t0 = time.perf_counter()
            try:
                r = bench(name, mode, args, device)
            except Exception as e:  # noqa: BLE001 - report and go on with the other configurations
                r = {"config": name, "mode": mode, "error": f"{type(e).__name__}: {e}"[:500]}
            took[compiled] = max(took.get(compiled, 0.0), time.perf_counter() - t0)
        results.append(r)
        line = json.dumps(r)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()
    text = table(results, device, args) + f"\ntotal {time.perf_counter() - t_start:.0f} s"
    print("\n" + text)
    if out_dir:
        (Path(out_dir) / "gpu_train_table.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
