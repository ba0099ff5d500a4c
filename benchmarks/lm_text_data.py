"""Measurements behind docs/lm_data.md: the text readers, the Austen demo's data, packing under torch.export, and
the demo student's training throughput. Each part prints one line per figure.

    python benchmarks/lm_text_data.py readers      # Austen / KJV documents, characters, read time
    python benchmarks/lm_text_data.py austen       # the demo spec's data section through the SmolLM2 GGUF tokenizer
    python benchmarks/lm_text_data.py packing      # packed rows vs documents alone: eager and torch.export logits
    python benchmarks/lm_text_data.py student [cpu|cuda] [BATCH]   # demo student fwd + bwd + AdamW at seq 256
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

DEMO = Path(__file__).resolve().parent.parent / "specs" / "lm" / "austen_smollm2_to_tiny_llama.yaml"


def readers() -> None:
    from kdgraph.train.data.text_sources import read_austen, read_kjv

    for name, fn in (("austen", read_austen), ("kjv", read_kjv)):
        t = time.perf_counter()
        docs = fn()
        s = time.perf_counter() - t
        print(f"{name}: {len(docs):,} chapters, {len({d.book for d in docs})} books, "
              f"{sum(len(d.text) for d in docs):,} characters, read in {s:.2f} s")


def austen() -> None:
    from kdgraph.spec.data_section import DataSpec
    from kdgraph.train.data.text import text_datasets

    raw = yaml.safe_load(DEMO.read_text())
    spec = SimpleNamespace(data=DataSpec.model_validate(raw["data"]), input=SimpleNamespace(named=raw["input"]["named"]))
    t = time.perf_counter()
    train, val, desc, vocab = text_datasets(spec)
    print(f"{desc}; vocabulary {vocab:,}; {len(train):,} / {len(val):,} rows; built in {time.perf_counter() - t:.1f} s "
          f"(GGUF tokenizer load included)")


def packing() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    nets = {"llama": LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=64,
                                                  max_position_embeddings=64, use_cache=False)),
            "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                               bos_token_id=0, eos_token_id=0, use_cache=False))}

    class Logits(torch.nn.Module):
        def __init__(self, m: torch.nn.Module):
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, position_ids=position_ids).logits

    def pack(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        docs = [torch.randint(0, 64, (1, n)) for n in lengths]
        return torch.cat(docs, 1), torch.cat([torch.arange(n) for n in lengths])[None], docs

    for name, model in nets.items():
        model.eval()
        ids, pos, docs = pack([5, 7])
        alone = torch.cat([model(input_ids=d).logits for d in docs], 1)
        eager = (model(input_ids=ids, position_ids=pos).logits - alone).abs().max().item()
        T = torch.export.Dim("T", min=2, max=64)
        ep = torch.export.export(Logits(model), (ids, pos), dynamic_shapes={"input_ids": {1: T}, "position_ids": {1: T}},
                                 strict=False).module()
        exported = (ep(ids, pos) - alone).abs().max().item()
        ids2, pos2, docs2 = pack([3, 9, 4])  # another split and length than captured
        other = (ep(ids2, pos2) - torch.cat([model(input_ids=d).logits for d in docs2], 1)).abs().max().item()
        print(f"{name}: max |packed - alone| logits: eager {eager:.1e}, torch.export {exported:.1e}, exported at "
              f"another split (3+9+4 tokens) {other:.1e}")


def student(device: str = "cpu", batch: int = 8) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(yaml.safe_load(DEMO.read_text())["student"]["kwargs"]["config"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 49152, (batch, 256), device=device)
    pos = torch.arange(256, device=device).repeat(batch, 1)

    def step() -> None:
        model(input_ids=ids, position_ids=pos, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    step(), step()
    sync()
    n = 50 if device.startswith("cuda") else 5
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    s = (time.perf_counter() - t) / n
    print(f"student ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, fp32) on {device}, "
          f"{torch.get_num_threads()} thread(s), batch {batch} x 256: {s:.3f} s per step, {batch * 256 / s:,.0f} "
          f"tokens/s (forward + backward + AdamW, next-token CE)")


if __name__ == "__main__":
    part, args = (sys.argv[1] if len(sys.argv) > 1 else "readers"), sys.argv[2:]
    {"readers": readers, "austen": austen, "packing": packing}.get(part, lambda: None)()
    if part == "student":
        student(args[0] if args else "cpu", int(args[1]) if len(args) > 1 else 8)
