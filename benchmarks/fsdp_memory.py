"""Per-rank memory and step time of FSDP2 (runtime.distributed: fsdp) against DDP, on CPU gloo.

    torchrun --standalone --nproc_per_node=2 benchmarks/fsdp_memory.py [--spec specs/fashion_mnist/kd.yaml]
        [--steps 10] [--units type:BasicBlock]
    torchrun --standalone --nproc_per_node=2 benchmarks/fsdp_memory.py --bert [--steps 10]

``--bert``: the GLUE MRPC spec's BERT-Large -> BERT-Base pair scaled down to run on 2 CPU cores (teacher hidden 256,
4 layers, 4 heads, FFN 1024; student hidden 128, 2 layers, 2 heads, FFN 512; BERT's 30522-token vocabulary,
sequences of 64 tokens, batch 8 per process, random weights), units ``bert.encoder.layer.*`` in both, AdamW.

For each mode (ddp, then fsdp with teacher and student units ``--units``) it compiles the spec (random weights:
memory and time do not depend on them), runs ``--steps`` AdamW/SGD steps (the stage's optimizer type, lr 1e-3) on
random batches of the stage's batch size per process, and prints per rank: the bytes of the teacher's parameters
it holds, the bytes of the student's parameters plus optimizer state it holds (after the steps), and the median
step time. Rank 0 prints one line per mode and the FSDP/DDP ratios.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import kdgraph
from kdgraph.train import fsdp
from kdgraph.train.distributed import DistEnv, wrap


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


BERT_TEACHER = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}
BERT_STUDENT = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512}
BERT_SEQ, BERT_BATCH = 64, 8


def bert_spec(spec_path: str) -> dict:
    """The MRPC spec with the scaled-down pair, random weights, 64-token inputs and batch 8 (as a dict)."""
    data = kdgraph.load_spec(spec_path).model_dump(mode="json")
    for role, cfg in (("teacher", BERT_TEACHER), ("student", BERT_STUDENT)):
        data[role]["kwargs"]["config"].update(cfg)
        data[role]["weights"] = None
    for field in data["input"]["named"].values():
        field["shape"] = [BERT_SEQ]
    data["stages"][0]["batch_size"] = BERT_BATCH
    return data


def batch(spec, stage, g: torch.Generator) -> tuple[tuple, dict]:
    """Random inputs of the spec's shape: images and labels, or a tokenized batch (dict) for named inputs."""
    if spec.input.named:
        n, seq = stage.batch_size, spec.input.named["input_ids"].shape[0]
        vocab = spec.input.named["input_ids"].high
        return ({"input_ids": torch.randint(0, vocab, (n, seq), generator=g),
                 "attention_mask": torch.ones(n, seq, dtype=torch.int64),
                 "token_type_ids": (torch.arange(seq) >= seq // 2).long().expand(n, seq).contiguous(),
                 "labels": torch.randint(0, spec.input.num_classes, (n,), generator=g)},), {}
    c, (h, w) = spec.input.channels, spec.input.size
    return (torch.randn(stage.batch_size, c, h, w, generator=g),
            torch.randint(0, spec.input.num_classes, (stage.batch_size,), generator=g)), {}


def run(spec_path: str | dict, mode: str, steps: int, units: list[str]) -> dict:
    spec = kdgraph.load_spec(spec_path).model_copy(deep=True)
    spec.runtime.channels_last = False
    if mode == "fsdp":
        spec = kdgraph.load_spec({**spec.model_dump(mode="json"),
                                  "runtime": {**spec.runtime.model_dump(mode="json"), "distributed": "fsdp",
                                              "fsdp": {"teacher_units": units, "student_units": units}}})
    torch.manual_seed(0)
    d = kdgraph.compile(spec)
    rank, world = dist.get_rank(), dist.get_world_size()
    env = DistEnv(rank, world, 0, torch.device("cpu"), "gloo")
    model = wrap(d, env) if mode == "ddp" else fsdp.shard(d)
    stage = spec.stages[0]
    opt_cls = torch.optim.AdamW if stage.optimizer.type == "adamw" else torch.optim.SGD
    opt = opt_cls(d.trainable_parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(steps):
        args, kwargs = batch(spec, stage, g)
        t0 = time.perf_counter()
        out = model(*args, **kwargs)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    opt_state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {"teacher_param_bytes": local_bytes(d.teacher.parameters()),
            "student_param_opt_bytes": local_bytes(d.student.parameters()) + local_bytes(opt_state),
            "step_s": statistics.median(times[1:] if len(times) > 1 else times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="specs/fashion_mnist/kd.yaml")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--units", nargs="+", default=None, help="default: type:BasicBlock (--bert: "
                                                              "bert.encoder.layer.*)")
    ap.add_argument("--bert", action="store_true", help="the scaled-down BERT pair of the MRPC spec (see above)")
    args = ap.parse_args()
    spec: str | dict = args.spec
    if args.bert:
        spec = bert_spec(args.spec if args.spec.endswith("mrpc.yaml") else "specs/glue/mrpc.yaml")
    units = args.units or (["bert.encoder.layer.*"] if args.bert else ["type:BasicBlock"])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for mode in ("ddp", "fsdp"):
        r = run(spec, mode, args.steps, units)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, r)
        results[mode] = gathered
        if rank == 0:
            for i, g in enumerate(gathered):
                print(f"{mode} rank {i}: teacher params {g['teacher_param_bytes'] / 2**20:.2f} MiB, student params + "
                      f"optimizer state {g['student_param_opt_bytes'] / 2**20:.2f} MiB, step {g['step_s'] * 1e3:.0f} ms")
    if rank == 0:
        d0, f0 = results["ddp"][0], results["fsdp"][0]
        print(f"fsdp/ddp per rank: teacher params {f0['teacher_param_bytes'] / d0['teacher_param_bytes']:.3f}, "
              f"student params + optimizer state {f0['student_param_opt_bytes'] / d0['student_param_opt_bytes']:.3f}, "
              f"step time {f0['step_s'] / d0['step_s']:.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
