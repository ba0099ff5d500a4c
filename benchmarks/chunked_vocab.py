"""Peak memory and step time of a token loss with dense logits vs the chunked vocabulary pass, on CPU.

    python benchmarks/chunked_vocab.py [--vocab 49152] [--seq 512] [--batch 1] [--hidden 256] [--layers 2]
                                       [--chunks 0,256,64] [--steps 3]

Two random Llama networks (``hf:AutoModelForCausalLM``; student: ``--hidden`` wide, ``--layers`` deep, tied
49,152-word embedding; teacher: the same width, twice as deep) distilled with ``token_kl`` on ``lm_head`` outputs,
one batch of ``--batch`` x ``--seq`` tokens (the first 10 % of each sequence a prompt, labels -100). Chunk 0 is the
dense path (``runtime.chunked_vocab`` unset); any other value is ``runtime.chunked_vocab: {chunk_tokens: N}``.

Each variant runs in its own process (``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors go back to the OS and the
resident set follows the live tensors): compile, one warm-up training step (forward, backward, AdamW), then the
peak-RSS counter is reset (``/proc/self/clear_refs`` = 5) and ``--steps`` timed steps run. "step peak" is the peak
resident set during those steps minus the resident set before them: the memory a step needs beyond the networks,
gradients and optimizer state. Step time is the median wall time; step CPU time the median process CPU time (less
sensitive to other processes on a shared machine). The loss of the first timed step is printed for each variant (equal up to float
rounding: the pass does not change the objective).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    """A ``/proc/self/status`` entry in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _spec(a, chunk: int) -> dict:
    def llama(layers: int) -> dict:
        return {"model_type": "llama", "vocab_size": a.vocab, "hidden_size": a.hidden, "num_hidden_layers": layers,
                "num_attention_heads": max(1, a.hidden // 64), "intermediate_size": 4 * a.hidden,
                "max_position_embeddings": a.seq, "use_cache": False, "tie_word_embeddings": True}

    spec = {"name": "chunked_vocab_bench",
            "input": {"named": {"input_ids": {"shape": [a.seq], "dtype": "int64", "high": a.vocab},
                                "attention_mask": {"shape": [a.seq], "dtype": "int64"}}},
            "teacher": {"model": "hf:AutoModelForCausalLM", "kwargs": {"config": llama(2 * a.layers)}},
            "student": {"model": "hf:AutoModelForCausalLM", "kwargs": {"config": llama(a.layers)}},
            "stages": [{"name": "main", "batch_size": a.batch, "optimizer": {"type": "adamw", "lr": 1.0e-4},
                        "losses": [{"name": "kd", "type": "token_kl",
                                    "inputs": {"student": "student:lm_head", "teacher": "teacher:lm_head"}}]}],
            "data": {"dataset": "synthetic"}}
    if chunk:
        spec["runtime"] = {"chunked_vocab": {"chunk_tokens": chunk}}
    return spec


def child(a) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    import kdgraph

    torch.manual_seed(0)
    d = kdgraph.compile(_spec(a, a.child))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    labels = ids.clone()
    labels[:, :a.seq // 10] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = d(batch)
        out.loss.backward()
        opt.step()
        return float(out.loss)

    step()  # warm-up: optimizer state, allocator
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    times, cpu, losses = [], [], []
    for _ in range(a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    passes = {p.name: p.summary for p in d.report.passes}
    print(json.dumps({"chunk": a.child, "peak_mb": (_status("VmHWM") - before) / 2 ** 20,
                      "rss_mb": before / 2 ** 20, "step_s": statistics.median(times),
                      "cpu_s": statistics.median(cpu), "loss": losses[0],
                      "pass": passes["chunked_vocab"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--chunks", default="0,256,64", help="comma-separated chunk_tokens; 0: the dense path")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        return child(a)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    rows = []
    for chunk in [int(c) for c in a.chunks.split(",")]:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", str(chunk)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"# {rows[-1]}", file=sys.stderr)
    dense = next((r for r in rows if r["chunk"] == 0), rows[0])
    print(f"vocab {a.vocab}, sequence {a.seq}, batch {a.batch}, student hidden {a.hidden} x {a.layers} layers "
          f"(teacher x {2 * a.layers}), token_kl, CPU threads {os.environ.get('OMP_NUM_THREADS', 'default')}\n")
    print("| path | step peak (MiB) | vs dense | step time (s) | vs dense | step CPU time (s) | vs dense | loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = "dense logits" if r["chunk"] == 0 else f"chunked, {r['chunk']} tokens"
        print(f"| {name} | {r['peak_mb']:.0f} | {r['peak_mb'] / dense['peak_mb']:.2f} | {r['step_s']:.2f} | "
              f"{r['step_s'] / dense['step_s']:.2f} | {r['cpu_s']:.2f} | {r['cpu_s'] / dense['cpu_s']:.2f} | "
              f"{r['loss']:.6f} |")


if __name__ == "__main__":
    main()
