"""FSDP2 (``runtime.distributed: fsdp``) against DDP on GPUs: images or sequences per second and peak memory per GPU.

    torchrun --standalone --nproc_per_node=N benchmarks/gpu_fsdp.py        # N GPUs (N = 1 works: a group of one)
    python benchmarks/gpu_fsdp.py --dry-run                                # CPU, tiny shapes, 1 process: a check

Two pairs, each under three modes (in this order):

    resnet  specs/kd_resnet18.yaml: ResNet-34 -> ResNet-18 KD, batch 256 per GPU, 224x224, random weights (the
            step's cost does not depend on them); units type:BasicBlock in both networks
    bert    specs/glue/mrpc.yaml: BERT-Large -> BERT-Base (the spec's weights when the folders exist, else random),
            batch 16 per GPU (the spec's), 128 tokens; units bert.encoder.layer.* in both

    ddp       DistributedDataParallel over the trainable part, every GPU holds both networks (on one GPU: no
              wrapper, as kdgraph train in a world of one)
    fsdp      FSDP2 units as above (teacher sharded), parameters and gradients fp32
    fsdp_mp   the same with runtime.fsdp param_dtype bf16, reduce_dtype fp32 (gathers in bf16); BERT only: with
              BatchNorm (the ResNets) bf16 parameters meet fp32 running statistics, which PyTorch's CPU batch_norm
              refuses ("expected scalar type BFloat16 but found Float"), so kdgraph refuses it there too

Every mode runs under bf16 autocast (``runtime.amp: bf16``), channels_last off (FSDP2 shards dim 0 of plain
tensors), the stage's optimizer on ``trainable_parameters()`` as ``kdgraph train`` builds it, synthetic batches already
on the GPU (the number is the distiller's, not the loader's). Warm-up steps, then timed steps synchronised per step;
throughput = global batch (per-GPU batch x N) / median step. Peak memory per GPU: ``torch.cuda.max_memory_allocated``
over the timed steps (statistics reset after warm-up), every rank's. Also per rank: the bytes of the teacher's
parameters and of the student's parameters + optimizer state it holds. One JSON line per (pair, mode) on stdout (and in
$OUT/gpu_fsdp.jsonl when OUT is set), then a table. ``--dry-run``: CPU, gloo, 32x32 images / 16 tokens, batch 2,
BERT scaled down (fsdp_memory.py's pair), 1 warm-up + 2 timed steps, autocast off (bf16 autocast is emulated,
slowly, on CPUs without bf16 instructions): checks that every row runs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import kdgraph  # noqa: E402
from fsdp_memory import batch, bert_spec, local_bytes  # noqa: E402
from kdgraph.train import fsdp  # noqa: E402
from kdgraph.train.distributed import DistEnv, wrap  # noqa: E402
from kdgraph.train.optim import build_optimizer, lr_used  # noqa: E402

MODES = ("ddp", "fsdp", "fsdp_mp")
UNITS = {"resnet": ["type:BasicBlock"], "bert": ["bert.encoder.layer.*"]}


def pair_spec(pair: str, dry: bool) -> dict:
    """The pair's spec as a dict: random weights where the files are absent, the dry run's tiny shapes."""
    if pair == "resnet":
        data = kdgraph.load_spec(ROOT / "specs/kd_resnet18.yaml").model_dump(mode="json")
        data["teacher"]["weights"] = None
        if dry:
            data["input"]["size"], data["input"]["num_classes"], data["stages"][0]["batch_size"] = [32, 32], 10, 2
            for role in ("teacher", "student"):
                data[role]["kwargs"] = {**(data[role].get("kwargs") or {}), "num_classes": 10}
        return data
    if dry:
        data = bert_spec(str(ROOT / "specs/glue/mrpc.yaml"))
        for field in data["input"]["named"].values():
            field["shape"] = [16]
        data["stages"][0]["batch_size"] = 2
        return data
    data = kdgraph.load_spec(ROOT / "specs/glue/mrpc.yaml").model_dump(mode="json")
    for role in ("teacher", "student"):
        w = data[role]["weights"]
        if w is None or not Path(w).exists():
            data[role]["weights"] = None
    return data


def with_mode(data: dict, pair: str, mode: str) -> "kdgraph.Spec":
    rt = {**data["runtime"], "amp": "bf16", "channels_last": False, "compile": False}
    if mode != "ddp":
        rt["distributed"] = "fsdp"
        rt["fsdp"] = {"teacher_units": UNITS[pair], "student_units": UNITS[pair],
                      **({"param_dtype": "bf16", "reduce_dtype": "fp32"} if mode == "fsdp_mp" else {})}
    return kdgraph.load_spec({**data, "runtime": rt})


def bench(pair: str, mode: str, args, device: torch.device) -> dict:
    spec = with_mode(pair_spec(pair, args.dry_run), pair, mode)
    stage = spec.stages[0]
    rank, world = dist.get_rank(), dist.get_world_size()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    d = kdgraph.compile(spec)
    d.load_weights()
    d.to(device).train()
    env = DistEnv(rank, world, int(os.environ.get("LOCAL_RANK", "0")), device, dist.get_backend())
    model = fsdp.shard(d) if mode != "ddp" else wrap(d, env)
    opt = build_optimizer(stage, list(d.trainable_parameters()), lr_used(stage, world), d)
    g = torch.Generator().manual_seed(rank)
    inputs, kwargs = batch(spec, stage, g)
    inputs = tuple({k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device) for x in inputs)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=not args.dry_run)

    def step() -> float:
        t0 = time.perf_counter()
        with amp:
            out = model(*inputs, **kwargs)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [step() for _ in range(args.steps)]
    med = statistics.median(times)
    opt_state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    mine = {"step_s": med, "peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30
            if device.type == "cuda" else None,
            "teacher_param_mib": local_bytes(d.teacher.parameters()) / 2 ** 20,
            "student_param_opt_mib": (local_bytes(d.student.parameters()) + local_bytes(opt_state)) / 2 ** 20}
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    per_gpu = stage.batch_size
    slowest = max(r["step_s"] for r in every)  # a step ends when the slowest rank's does
    unit = "sequences" if spec.input.named else "images"
    del model, d, opt
    return {"pair": pair, "mode": mode, "world_size": world, "batch_per_gpu": per_gpu, "unit": unit,
            f"{unit}_per_s": round(per_gpu * world / slowest, 1), "step_ms": round(slowest * 1000, 1),
            "peak_gib_per_gpu": [None if r["peak_gib"] is None else round(r["peak_gib"], 2) for r in every],
            "teacher_param_mib_per_rank": [round(r["teacher_param_mib"], 1) for r in every],
            "student_param_opt_mib_per_rank": [round(r["student_param_opt_mib"], 1) for r in every],
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "timed_steps": args.steps, "amp": "off" if args.dry_run else "bf16"}


def table(rows: list[dict]) -> str:
    lines = [f"{'pair':7} {'mode':8} {'per s':>9} {'step ms':>8} {'peak GiB/GPU':>14} {'teacher MiB':>12} "
             f"{'student+opt MiB':>16}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['pair']:7} {r['mode']:8} error: {r['error']}")
            continue
        rate = r.get("images_per_s", r.get("sequences_per_s"))
        peak = "-" if r["peak_gib_per_gpu"][0] is None else "/".join(map(str, r["peak_gib_per_gpu"]))
        lines.append(f"{r['pair']:7} {r['mode']:8} {rate:>9} {r['step_ms']:>8} {peak:>14} "
                     f"{r['teacher_param_mib_per_rank'][0]:>12} {r['student_param_opt_mib_per_rank'][0]:>16}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 2 timed steps: checks every row runs")
    ap.add_argument("--pairs", nargs="+", choices=sorted(UNITS), default=["resnet", "bert"])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.steps, args.warmup = 2, 1
    cuda = torch.cuda.is_available() and not args.dry_run
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned and "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    elif owned:  # one process without torchrun: a group of one
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{tempfile.mktemp()}", rank=0,
                                world_size=1)
    out_dir = os.environ.get("OUT")
    main_rank = dist.get_rank() == 0
    sink = open(Path(out_dir) / "gpu_fsdp.jsonl", "a") if out_dir and main_rank else None
    rows = []
    try:
        for pair in args.pairs:
            for mode in [m for m in args.modes if m != "fsdp_mp" or pair == "bert"]:
                try:
                    r = bench(pair, mode, args, device)
                except Exception as e:  # noqa: BLE001 - report and go on with the other rows
                    if args.dry_run:
                        raise
                    r = {"pair": pair, "mode": mode, "error": f"{type(e).__name__}: {e}"[:500]}
                rows.append(r)
                if main_rank:
                    print(json.dumps(r), flush=True)
                    if sink:
                        sink.write(json.dumps(r) + "\n")
                        sink.flush()
        if main_rank:
            print("\n" + table(rows))
    finally:
        if owned:
            dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    main()
