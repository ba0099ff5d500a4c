"""The per-token top-K teacher cache on a small random Llama pair (CPU): bytes per token, write throughput,
and the replayed training step against the live teacher.

    python benchmarks/token_cache.py [--vocab 49152] [--topk 128] [--seq 128] [--seqs 32] [--batch 4] [--rounds 10]
                                     [--teacher-layers 4] [--teacher-hidden 256]

Teacher: Llama 4 layers x d 256 (``--teacher-layers``, ``--teacher-hidden``), student 2 layers x d 64, vocabulary ``--vocab`` (default SmolLM2's 49,152),
random weights (saved to a temporary file, as cache-teacher refuses a random teacher). Sequences: random ids, the
first 8 labels of each -100 (a prompt). Steps: the compiled token_kl distiller's forward + backward + AdamW step,
live (teacher:lm_head online) and replayed (teacher:lm_head from the cache, the teacher pruned; the time to read
the batch's sparse teacher from the memory-mapped cache included), interleaved, after one warm-up each; medians.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kdgraph  # noqa: E402
from kdgraph.models import build_model  # noqa: E402
from kdgraph.train.teacher_cache.token_data import TokenArrays  # noqa: E402
from kdgraph.train.teacher_cache.token_reader import open_token_cache  # noqa: E402
from kdgraph.train.teacher_cache.tokens import cache_tokens, describe_tokens  # noqa: E402


def config(vocab: int, hidden: int, layers: int) -> dict:
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": 4, "intermediate_size": 2 * hidden, "max_position_embeddings": 512,
            "use_cache": False}


def spec_file(tmp: Path, a: argparse.Namespace, cache: str | None) -> Path:
    spec = {"name": "token_cache_bench",
            "input": {"named": {"input_ids": {"shape": [a.seq], "dtype": "int64", "high": a.vocab},
                                "attention_mask": {"shape": [a.seq], "dtype": "int64"}}},
            "teacher": {"model": "hf:AutoModelForCausalLM", "kwargs": {"config": config(a.vocab, a.teacher_hidden, a.teacher_layers)},
                        "weights": str(tmp / "teacher.pt")},
            "student": {"model": "hf:AutoModelForCausalLM", "kwargs": {"config": config(a.vocab, 64, 2)}},
            "stages": [{"name": "main", "epochs": 1, "batch_size": a.batch, "train": ["student"],
                        "optimizer": {"type": "adamw", "lr": 1e-4},
                        "losses": [{"name": "kd", "type": "token_kl",
                                    "inputs": {"student": "student:lm_head", "teacher": "teacher:lm_head"}}]}],
            "data": {"dataset": "synthetic"},
            "runtime": {"teacher_cache_tap": "teacher:lm_head", **({"teacher_cache": cache} if cache else {})}}
    path = tmp / f"spec_{'cached' if cache else 'live'}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--topk", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--teacher-hidden", type=int, default=256)
    a = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        live_path = spec_file(tmp, a, None)
        spec = kdgraph.load_spec(live_path)
        teacher = build_model(spec.teacher, "teacher").eval()
        torch.save(teacher.state_dict(), tmp / "teacher.pt")
        g = np.random.default_rng(0)
        ids = g.integers(0, a.vocab, (a.seqs, a.seq))
        labels = ids.copy()
        labels[:, :8] = -100
        np.savez(tmp / "seqs.npz", input_ids=ids, attention_mask=np.ones_like(ids), labels=labels)
        data = TokenArrays(tmp / "seqs.npz")
        w = cache_tokens(spec, tmp / "cache", a.topk, sequences=str(tmp / "seqs.npz"), device="cpu",
                         batch_size=a.batch, say=lambda m: None, teacher=teacher)
        files = sorted((tmp / "cache").glob("rank000-of-001.*.npy"))
        on_disk = sum(f.stat().st_size for f in files)
        cached_spec = kdgraph.load_spec(spec_file(tmp, a, str(tmp / "cache")))
        reader = open_token_cache(tmp / "cache", describe_tokens(cached_spec, teacher, data), "bench")
        live, cached = kdgraph.compile(spec), kdgraph.compile(cached_spec)
        live.load_weights()
        cached.student.load_state_dict(live.student.state_dict())
        opts = {n: torch.optim.AdamW(d.student.parameters(), lr=1e-4) for n, d in (("live", live),
                                                                                   ("cached", cached))}
        times: dict[str, list[float]] = {"live": [], "cached": [], "read": []}
        for r in range(a.rounds + 1):
            idx = [(r * a.batch + i) % a.seqs for i in range(a.batch)]
            batch = data.get_batch(idx)
            for name, d in (("live", live), ("cached", cached)):
                t0 = time.perf_counter()
                extra = {}
                if name == "cached":
                    extra = reader.outputs(idx)
                    t_read = time.perf_counter() - t0
                out = d({**batch, **extra})
                opts[name].zero_grad()
                out.loss.backward()
                opts[name].step()
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - t0)
                    if name == "cached":
                        times["read"].append(t_read)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({
            "teacher": f"{a.teacher_layers} x {a.teacher_hidden}", "student": "2 x 64", "vocab": a.vocab,
            "topk": a.topk, "id_bits": w["id_bits"], "seq": a.seq, "sequences": a.seqs,
            "kept_tokens": w["kept_tokens"], "bytes_per_token_format": w["bytes_per_token"],
            "bytes_per_token_on_disk": round(on_disk / w["kept_tokens"], 1),
            "write_tokens_per_s": w["tokens_per_s"], "batch": a.batch, "rounds": a.rounds,
            "step_live_s": round(med["live"], 4), "step_cached_s": round(med["cached"], 4),
            "read_sparse_teacher_s": round(med["read"], 4),
            "speedup": round(med["live"] / med["cached"], 2),
            "device": "cpu", "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
