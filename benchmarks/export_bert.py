"""BERT through the torch.export backend: compile time of the full-size GLUE pair, step time of a small pair.

    python benchmarks/export_bert.py [--repeats 3] [--steps 12] [--skip-full]

1. Compile time: ``kdgraph.compile`` of specs/glue/mrpc.yaml's networks (BERT-Large teacher, 24 x 1024, and
   BERT-Base student, 12 x 768, random init from their configs, sequence 128), median of ``--repeats``; the time to
   build the two models is measured apart and not counted.
2. Step time (forward, backward, SGD) of a small BERT pair (teacher 4 x 256, student 2 x 128, vocab 30522,
   batch 16, sequence 128) with KD on the classifier logits plus CE: kdgraph's fused graph vs an eager loop with a
   forward hook on each network's classifier (the teacher in eval mode under ``torch.no_grad()``), interleaved in
   one process after warm-up, medians; the losses of both are checked to agree.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kdgraph  # noqa: E402
from kdgraph.models import build_model  # noqa: E402


def compile_time(repeats: int) -> dict:
    spec = kdgraph.load_spec(ROOT / "specs" / "glue" / "mrpc.yaml")
    t0 = time.perf_counter()
    teacher, student = build_model(spec.teacher, "teacher"), build_model(spec.student, "student")
    build_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        d = kdgraph.compile(spec, teacher=teacher, student=student)
        times.append(time.perf_counter() - t0)
    return {"spec": "specs/glue/mrpc.yaml", "build_models_s": round(build_s, 2),
            "compile_s_median": round(statistics.median(times), 2), "compile_s": [round(t, 2) for t in times],
            "backends": {r: n.backend for r, n in d.traced.items()},
            "teacher_nodes": d.report.teacher_nodes, "graph_nodes": len(d.graph_module.graph.nodes)}


def small_pair(steps: int, batch: int = 16, seq: int = 128) -> dict:
    from transformers import BertConfig, BertForSequenceClassification

    def bert(layers: int, hidden: int, seed: int):
        torch.manual_seed(seed)
        return BertForSequenceClassification(BertConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=4 * hidden,
            num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))

    named = {k: {"shape": [seq], "dtype": "int64", "high": 30522 if k == "input_ids" else 2}
             for k in ("input_ids", "attention_mask", "token_type_ids")}
    spec = {"name": "bert_small", "input": {"num_classes": 2, "named": named},
            "teacher": {"model": "registered:t"}, "student": {"model": "registered:s"},
            "stages": [{"name": "main", "optimizer": {"lr": 0.01}, "losses": [
                {"name": "ce", "type": "cross_entropy", "weight": 0.5, "inputs": {"logits": "student:classifier"}},
                {"name": "kd", "type": "kd", "weight": 0.5, "args": {"temperature": 2.0},
                 "inputs": {"student": "student:classifier", "teacher": "teacher:classifier"}}]}]}
    teacher, student = bert(4, 256, 0), bert(2, 128, 1)
    d = kdgraph.compile(spec, teacher=teacher, student=student)
    d.train()
    h_teacher, h_student = copy.deepcopy(teacher).eval(), copy.deepcopy(student).train()
    h_teacher.requires_grad_(False)
    losses = copy.deepcopy(d.losses["main"])
    seen: dict[str, torch.Tensor] = {}
    h_teacher.classifier.register_forward_hook(lambda _m, _i, o: seen.__setitem__("t", o))
    h_student.classifier.register_forward_hook(lambda _m, _i, o: seen.__setitem__("s", o))
    opt_k = torch.optim.SGD(d.trainable_parameters(), lr=0.01)
    opt_h = torch.optim.SGD(h_student.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    batch_data = {"input_ids": torch.randint(0, 30522, (batch, seq), generator=g),
                  "attention_mask": torch.ones(batch, seq, dtype=torch.long),
                  "token_type_ids": torch.zeros(batch, seq, dtype=torch.long),
                  "labels": torch.randint(0, 2, (batch,), generator=g)}
    inputs = {k: v for k, v in batch_data.items() if k != "labels"}

    def kdgraph_step() -> float:
        out = d(batch_data)
        opt_k.zero_grad(set_to_none=True)
        out.loss.backward()
        opt_k.step()
        return out.loss.item()

    def hand_step() -> float:
        with torch.no_grad():
            h_teacher(**inputs)
        h_student(**inputs)
        loss = (0.5 * losses["ce"](logits=seen["s"], targets=batch_data["labels"])
                + 0.5 * losses["kd"](student=seen["s"], teacher=seen["t"]))
        opt_h.zero_grad(set_to_none=True)
        loss.backward()
        opt_h.step()
        return loss.item()

    first = kdgraph_step(), hand_step()
    for _ in range(2):
        kdgraph_step(), hand_step()
    tk, th = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        kdgraph_step()
        tk.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hand_step()
        th.append(time.perf_counter() - t0)
    mk, mh = statistics.median(tk), statistics.median(th)
    return {"pair": "BERT 4x256 -> 2x128, batch 16, seq 128", "kdgraph_ms": round(1e3 * mk, 1),
            "hand_ms": round(1e3 * mh, 1), "ratio": round(mk / mh, 3),
            "first_loss": {"kdgraph": round(first[0], 6), "hand": round(first[1], 6)},
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip-full", action="store_true", help="skip the full-size compile time")
    args = ap.parse_args()
    res = {"small_pair_step": small_pair(args.steps)}
    if not args.skip_full:
        res["full_size_compile"] = compile_time(args.repeats)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
