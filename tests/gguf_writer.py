"""A tiny GGUF file written the way llama.cpp's convert_hf_to_gguf.py writes a Llama (gguf's GGUFWriter, llama.cpp's
tensor names, its q/k row permutation, F32 tensors), for the GGUF teacher tests."""
from __future__ import annotations

import numpy as np


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (q/k rows reordered for its rope)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


#: a tiny byte-level BPE vocabulary (GPT-2 style, as SmolLM2's GGUF holds one): specials, letters, six merges
_LETTERS = list("abcdefghijklmnopqrstuvwxyz") + ["\u0120"]  # "\u0120" (Ġ): GPT-2's byte-level space
_MERGES = ["a b", "ab c", "\u0120 a", "e m", "em m", "emm a"]
_MERGED = ["ab", "abc", "\u0120a", "em", "emm", "emma"]


def _add_tokenizer(w, vocab_size: int) -> None:
    tokens = ["<unk>", "<s>", "</s>"] + _LETTERS + _MERGED
    types = [2, 3, 3] + [1] * (len(tokens) - 3)
    pad = vocab_size - len(tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens + [f"<extra{i}>" for i in range(pad)])
    w.add_token_types(types + [4] * pad)
    w.add_token_merges(_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def write_tiny_gguf(model, path, tokenizer: bool = False) -> None:
    """``model`` (a LlamaForCausalLM) as a GGUF file: llama metadata and F32 tensors under llama.cpp's names; with
    ``tokenizer`` also a tiny GPT-2 BPE tokenizer ("emma abc" -> emma, Ġ, abc)."""
    import gguf

    c = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))  # transformers 5 keeps it in rope_parameters
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if tokenizer:
        _add_tokenizer(w, c.vocab_size)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue  # tied: GGUF leaves output.weight out, which is how transformers reads tie_word_embeddings
        base, suffix = key.rsplit(".", 1)
        arr = t.detach().float().numpy().copy()
        if base.endswith("q_proj"):
            arr = _permute(arr, c.num_attention_heads)
        elif base.endswith("k_proj"):
            arr = _permute(arr, c.num_key_value_heads)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
