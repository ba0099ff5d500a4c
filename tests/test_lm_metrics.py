"""The LM evaluation (data.dataset text): perplexity, bits per token and KL to the teacher against direct
computations, and a whole tiny `train` run writing them to metrics.jsonl and TensorBoard."""
from __future__ import annotations

import json
import math

import pytest
import torch

from kdgraph.train.data.text import TextRows, encode_documents, load_text_tokenizer
from kdgraph.train.data.text_sources import Document
from kdgraph.train.distributed import DistEnv
from kdgraph.train.evaluation import describe, evaluate_model

from test_text_data import LLAMA, WORDS, _tiny_llama, tok_dir  # noqa: F401 - the module fixture


def _env() -> DistEnv:
    return DistEnv(device=torch.device("cpu"))


def test_lm_metrics_equal_direct_computation(tok_dir):  # noqa: F811
    from torch.utils.data import DataLoader

    tok = load_text_tokenizer(str(tok_dir))
    words = WORDS.split()
    docs = [Document(" ".join(words[i:i + 7]), "b", str(i)) for i in range(0, 40, 4)]
    rows = TextRows(encode_documents(docs, tok, 12), 12, tok.pad_token_id, False, ["input_ids", "attention_mask"])
    loader = DataLoader(range(len(rows)), batch_size=4, collate_fn=rows.get_batch)
    student, teacher = _tiny_llama(len(tok)), _tiny_llama(len(tok) + 8)  # a padded teacher vocabulary
    torch.nn.init.normal_(teacher.lm_head.weight, std=0.5)
    student.train()
    ev = evaluate_model(student, loader, _env(), task="lm", reference=teacher)
    assert student.training and not teacher.training  # modes put back
    batch = rows.get_batch(range(len(rows)))
    labels = batch.pop("labels")
    with torch.no_grad():
        s, t = student(**batch).logits[:, :-1], teacher(**batch).logits[:, :-1, :len(tok)]
    lab = labels[:, 1:]
    keep = lab != -100
    ce = torch.nn.functional.cross_entropy(s[keep], lab[keep])
    kl = torch.nn.functional.kl_div(torch.log_softmax(s[keep], -1), torch.log_softmax(t[keep], -1), log_target=True,
                                    reduction="batchmean")
    assert ev["tokens"] == int(keep.sum()) == rows.scored_tokens and ev["images"] == len(rows)
    assert ev["perplexity"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
    assert ev["bits_per_token"] == pytest.approx(float(ce) / math.log(2), rel=1e-5)
    assert ev["kl_to_teacher"] == pytest.approx(float(kl), rel=1e-4) and ev["kl_to_teacher"] > 0.01
    assert ev["top1"] == pytest.approx(100.0 * float((s[keep].argmax(-1) == lab[keep]).float().mean()))
    assert ev["tokens_per_s"] > 0 and "perplexity" in describe(ev) and "KL to teacher" in describe(ev)
    alone = evaluate_model(teacher, loader, _env(), task="lm", reference=teacher)  # no KL of a network to itself
    assert "kl_to_teacher" not in alone


def test_train_on_text_writes_lm_metrics(tmp_path, tok_dir):  # noqa: F811
    from kdgraph.train import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = WORDS.split()
    for i in range(8):
        (corpus / f"{i}.txt").write_text(" ".join(words[(3 * i) % 30:(3 * i) % 30 + 14]))
    spec = f"""
name: text_e2e
input: {{named: {{input_ids: {{shape: [16], dtype: int64, high: 60}}, position_ids: {{shape: [16], dtype: int64}}}}}}
teacher: {{model: "hf:AutoModelForCausalLM", kwargs: {{config: {LLAMA}}}}}
student: {{model: "hf:AutoModelForCausalLM", kwargs: {{config: {LLAMA.replace("hidden_size: 32", "hidden_size: 16")}}}}}
stages: [{{name: main, epochs: 1, batch_size: 2, optimizer: {{type: adamw, lr: 1.0e-3}}, train: [student],
           losses: [{{name: kd, type: token_kl, inputs: {{student: "student:lm_head", teacher: "teacher:lm_head"}}}}]}}]
data: {{dataset: text, tokenizer: {tok_dir}, max_length: 16, workers: 0,
        text: {{sources: [{{kind: files, path: {corpus}}}], packing: true, validation: {{fraction: 0.25}}}}}}
runtime: {{eval_teacher: true}}
"""
    out = tmp_path / "run"
    train(spec, out=out, device="cpu", plot=False)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in recs if r["event"] == "eval"][-1]
    teacher = [r for r in recs if r["event"] == "teacher_eval"][-1]
    assert ev["task"] == "lm" and ev["tokens"] > 0 and ev["kl_to_teacher"] > 0 and 1 < ev["perplexity"] < 1000
    assert ev["bits_per_token"] == pytest.approx(math.log2(ev["perplexity"]))
    assert teacher["tokens"] == ev["tokens"] and "kl_to_teacher" not in teacher
    steps = [r for r in recs if r["event"] == "train"]
    assert steps and all(r["positions_per_s"] == pytest.approx(16 * r["images_per_s"], rel=1e-3) for r in steps)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert {"eval/main/perplexity", "eval/main/kl_to_teacher", "eval/main/tokens_per_s",
            "train/main/positions_per_s", "eval/main/positions_per_s"} <= set(acc.Tags()["scalars"])


def test_packed_batch_through_the_compiled_graph_equals_unpacked_eager(tmp_path, tok_dir):  # noqa: F811
    """The fused graph (torch.export capture) on packed rows gives the token_kl of the same documents run alone."""
    import kdgraph
    from kdgraph.methods.token_kl import TokenKL

    tok = load_text_tokenizer(str(tok_dir))
    words = WORDS.split()
    docs = [Document(" ".join(words[i:i + n]), "b", str(i)) for i, n in ((0, 5), (9, 8), (20, 4), (30, 11))]
    pieces = encode_documents(docs, tok, max_length=16)
    packed = TextRows(pieces, 16, tok.pad_token_id, True, ["input_ids", "position_ids"])
    plain = TextRows(pieces, 16, tok.pad_token_id, False, ["input_ids", "attention_mask"])
    assert len(packed) < len(plain)
    spec = kdgraph.load_spec(f"""
name: packed_graph
input: {{named: {{input_ids: {{shape: [16], dtype: int64, high: 60}}, position_ids: {{shape: [16], dtype: int64}}}}}}
teacher: {{model: "hf:AutoModelForCausalLM", kwargs: {{config: {LLAMA}}}}}
student: {{model: "hf:AutoModelForCausalLM", kwargs: {{config: {LLAMA.replace("num_hidden_layers: 2", "num_hidden_layers: 1")}}}}}
stages: [{{name: main, epochs: 1, batch_size: 2, optimizer: {{type: adamw, lr: 1.0e-3}}, train: [student],
           losses: [{{name: kd, type: token_kl, inputs: {{student: "student:lm_head", teacher: "teacher:lm_head"}}}}]}}]
data: {{dataset: synthetic}}
""")
    torch.manual_seed(0)
    d = kdgraph.compile(spec)
    d.eval()
    out = d(packed.get_batch(range(len(packed))))
    ub = plain.get_batch(range(len(plain)))
    labels = ub.pop("labels")
    with torch.no_grad():
        ref = TokenKL()(d.student(**ub).logits, d.teacher(**ub).logits, labels)
    torch.testing.assert_close(out.terms["kd"].detach(), ref, rtol=1e-5, atol=1e-6)
    assert float(ref) > 1e-4


def test_token_sums_chunked_equal_whole():
    from kdgraph.train.lm_metrics import token_sums

    g = torch.Generator().manual_seed(0)
    logits, ref = torch.randn(3, 9, 40, generator=g), torch.randn(3, 9, 48, generator=g)
    labels = torch.randint(0, 40, (3, 9), generator=g)
    labels[0, :4] = labels[2, 7:] = -100
    whole, chunked = token_sums(logits, labels, ref, chunk=10_000), token_sums(logits, labels, ref, chunk=5)
    assert whole[2:] == chunked[2:] and whole[4] == 3 * 8 - 3 - 2
    assert whole[0] == pytest.approx(chunked[0], rel=1e-6) and whole[1] == pytest.approx(chunked[1], rel=1e-6)
