"""Worker of tests/test_fsdp.py: one process (``python fsdp_worker.py OUT``, no process group) or each rank under
``torchrun --nproc_per_node=2 fsdp_worker.py OUT`` (FSDP2 over gloo). Both train the same distillers on the same
global batch with the custom-loop API; each rank takes its rows of the batch. Rank 0 (or the single process)
writes ``OUT/<mode>.pt``: per-step global losses, tap values, the student's full parameters after 3 steps, and
(under FSDP) how often each unit's parameters were really gathered and freed.

Pair 1: ResNet-34 (width 8, BatchNorm, frozen: eval statistics) -> ResNet-18 (width 4, GroupNorm so that per-rank
batches normalise like the global batch), 32x32, units type:BasicBlock in both, CE + KD + AT on taps inside units.
Pair 2: a network that calls its blocks in another order than it defines them (b2, b3, b1), units b1..b3.
Pair 3: a 2-layer BERT -> 1-layer BERT (hf:, captured with torch.export), units bert.encoder.layer.*, CE + KD.
"""
from __future__ import annotations

import os
import sys
from collections import Counter

import torch
import torch.distributed as dist
from torch import nn

import kdgraph
from kdgraph.zoo import resnet18_small, resnet34_small

STEPS, BATCH = 3, 8


def group_norm(model: nn.Module) -> nn.Module:
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(m, child_name, nn.GroupNorm(2, child.num_features))
    return model


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.conv(x))


class Shuffled(nn.Module):
    """Defines b1, b2, b3 and calls b2, b3, b1."""

    def __init__(self, c: int):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.b1, self.b2, self.b3 = Block(c), Block(c), Block(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.b1(self.b3(self.b2(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def spec(name: str, units: list[str], losses: list[dict]) -> dict:
    return {"name": name, "input": {"channels": 3, "size": [32, 32], "num_classes": 10},
            "teacher": {"model": "kdgraph.zoo:tiny_cnn"}, "student": {"model": "kdgraph.zoo:tiny_cnn"},
            "stages": [{"name": "main", "epochs": 1, "batch_size": BATCH, "losses": losses,
                        "optimizer": {"type": "sgd", "lr": 0.1}}],
            "runtime": {"distributed": "fsdp", "fsdp": {"teacher_units": units, "student_units": units}}}


TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 37, "vocab_size": 99, "max_position_embeddings": 64, "num_labels": 3,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # no dropout: same masks either way


def bert_pair():
    from kdgraph.models import build_model
    from kdgraph.spec import ModelRef

    ref = ModelRef(model="hf:AutoModelForSequenceClassification", kwargs={"config": TINY_BERT})
    small = ModelRef(model="hf:AutoModelForSequenceClassification",
                     kwargs={"config": {**TINY_BERT, "num_hidden_layers": 1}})
    return build_model(ref, "teacher"), build_model(small, "student")


BERT_SPEC = {**spec("fsdp_bert", ["bert.encoder.layer.*"], [{"name": "ce", "type": "cross_entropy"},
                                                             {"name": "kd", "type": "kd"}]),
             "input": {"num_classes": 3, "named": {"input_ids": {"shape": [8], "dtype": "int64", "high": 99}}}}

PAIRS = {
    "resnet": (lambda: (resnet34_small(3, 10, "s1", width=8), group_norm(resnet18_small(3, 10, "s1", width=4))),
               spec("fsdp_resnet", ["type:BasicBlock"],
                    [{"name": "ce", "type": "cross_entropy"}, {"name": "kd", "type": "kd", "args": {"temperature": 4}},
                     {"name": "at", "type": "at", "weight": 100,
                      "inputs": {"student": "student:layer2.0.conv2", "teacher": "teacher:layer2.1.conv1"}}])),
    "shuffled": (lambda: (Shuffled(8), Shuffled(4)),
                 spec("fsdp_shuffled", ["b1", "b2", "b3"], [{"name": "kd", "type": "kd"}])),
    "bert": (bert_pair, BERT_SPEC),  # captured by torch.export: parameters are attribute reads in the graph
}


class GatherCount:
    """Counts real gathers (sharded -> unsharded) and frees of each FSDP2 parameter group, by module path."""

    def __init__(self):
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        self.unshard, self.reshard = Counter(), Counter()
        orig_unshard, orig_reshard = FSDPParamGroup.unshard, FSDPParamGroup.reshard
        counter = self

        def unshard(group, *a, **k):
            was = group.is_unsharded or group._all_gather_result is not None
            out = orig_unshard(group, *a, **k)
            if not was:
                counter.unshard[group._module_fqn] += 1
            return out

        def reshard(group, *a, **k):
            was = group.is_unsharded
            out = orig_reshard(group, *a, **k)
            if was and not group.is_unsharded:
                counter.reshard[group._module_fqn] += 1
            return out

        FSDPParamGroup.unshard, FSDPParamGroup.reshard = unshard, reshard


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def run_pair(key: str, sharded: bool, counts: GatherCount | None) -> dict:
    build, sp = PAIRS[key]
    torch.manual_seed(0)
    teacher, student = build()
    d = kdgraph.compile(sp, teacher=teacher, student=student)
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    if sharded:
        from kdgraph.train import fsdp

        fsdp.shard(d)
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    out: dict = {"loss": [], "taps": None, "order": d.report.pass_result("fsdp_schedule").details["student"]["order"]}
    for step in range(STEPS):
        if key == "bert":
            x, y = torch.randint(0, 99, (BATCH, 8), generator=g), torch.randint(0, 3, (BATCH,), generator=g)
        else:
            x, y = torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
        if counts is not None and step == 0:
            counts.unshard.clear(), counts.reshard.clear()
        if key == "bert":
            res = d({"input_ids": x[rows], "labels": y[rows]}, return_taps=step == 0)
        else:
            res = d(x[rows], y[rows], return_taps=step == 0)
        res.loss.backward()
        if counts is not None and step == 0:
            out["unshard"], out["reshard"] = dict(counts.unshard), dict(counts.reshard)
        opt.step()
        opt.zero_grad()
        loss = res.loss.detach().clone()
        if sharded:
            dist.all_reduce(loss)
            loss /= world
        out["loss"].append(loss.item())
        if step == 0:
            taps = {k: v.detach().contiguous() for k, v in res.taps.items()}
            if sharded:
                gathered = [None] * world
                dist.all_gather_object(gathered, taps)
                taps = {k: torch.cat([t[k] for t in gathered]) for k in taps}
            out["taps"] = taps
    out["student"] = {k: full(v) for k, v in d.student.state_dict().items()}
    return out


def main(out_dir: str) -> None:
    sharded = "WORLD_SIZE" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    counts = GatherCount() if sharded else None
    result = {key: run_pair(key, sharded, counts) for key in PAIRS}
    if not sharded or dist.get_rank() == 0:
        torch.save(result, os.path.join(out_dir, "fsdp.pt" if sharded else "one.pt"))
    if sharded:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
