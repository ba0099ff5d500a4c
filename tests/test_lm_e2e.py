"""Issue 25 end to end: the causal-LM pieces together on a tiny Llama pair, a tokenizer trained here and ten lines of
local text (``data.dataset: text``, packed), through the real CLI (``kdgraph train``, ``cache-teacher``, ``export``)
or ``kdgraph.train.train``:

1. token_ce + token_kl under ``runtime.chunked_vocab`` (both losses chunked, no dense logits): the run writes
   perplexity / bits per token / KL; gradient accumulation 2 x 2 rows gives the weights of 1 x 4 rows (global
   token count ``num_tokens``);
2. ``cache-teacher --topk`` on that text, then training from the cache (chunked student, sparse teacher): the first
   step's loss is the live teacher's loss restricted to its top-K support, values rounded to bf16 as stored;
3. ``on_policy`` through ``kdgraph.train.train``: completions generated, logged, and the step's token count taken
   from the generated labels;
4. ``kdgraph export --hf`` of the trained student: ``from_pretrained`` gives the checkpoint's logits exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from torch.nn import functional as F

from kdgraph.cli import main

from test_text_data import WORDS, tok_dir  # noqa: F401 - the module fixture (a word-level tokenizer, ~60 entries)

V, T = 64, 16
TEACHER = {"model_type": "llama", "vocab_size": V, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64, "use_cache": False}
STUDENT = {**TEACHER, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
           "tie_word_embeddings": True}


def _spec(root: Path, tok: Path, packing: bool = True, **runtime) -> dict:
    named = {"input_ids": {"shape": [T], "dtype": "int64", "high": V},
             ("position_ids" if packing else "attention_mask"): {"shape": [T], "dtype": "int64"}}
    return {"name": "lm_e2e", "input": {"named": named},
            "teacher": {"model": "hf:AutoModelForCausalLM", "weights": str(root / "teacher.pt"),
                        "kwargs": {"config": TEACHER}},
            "student": {"model": "hf:AutoModelForCausalLM", "kwargs": {"config": STUDENT}},
            "stages": [{"name": "main", "epochs": 1, "batch_size": 4, "train": ["student"],
                        "optimizer": {"type": "sgd", "lr": 0.5, "momentum": 0.0},
                        "losses": [{"name": "ce", "type": "token_ce", "weight": 0.5},
                                   {"name": "kd", "type": "token_kl", "weight": 0.5,
                                    "inputs": {"student": "student:lm_head", "teacher": "teacher:lm_head"}}]}],
            "data": {"dataset": "text", "tokenizer": str(tok), "max_length": T, "workers": 0,
                     "text": {"sources": [{"kind": "files", "path": str(root / "corpus")}], "packing": packing,
                              "validation": {"fraction": 0.2}}},
            "runtime": {"seed": 0, "chunked_vocab": {"chunk_tokens": 5}, **runtime}}


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tok_dir):  # noqa: F811
    """A folder with ten one-line documents, a seeded teacher's weights and the spec writer."""
    root = tmp_path_factory.mktemp("lm_e2e")
    (root / "corpus").mkdir()
    words = WORDS.split()
    for i in range(10):
        (root / "corpus" / f"{i:02d}.txt").write_text(" ".join(words[(3 * i) % 30:(3 * i) % 30 + 12]))
    torch.manual_seed(0)
    teacher = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TEACHER))
    torch.save(teacher.state_dict(), root / "teacher.pt")

    def write(name: str, **kw) -> Path:
        path = root / f"{name}.yaml"
        path.write_text(json.dumps(_spec(root, tok_dir, **kw)))  # JSON is YAML
        return path
    return root, write, teacher.eval()


def _cli(*args: str) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _student(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=False)["student"]


def _close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-7, msg=k)


def test_chunked_ce_and_kl_on_packed_text_metrics_and_accumulation(lm):
    root, write, _ = lm
    spec = write("chunked")
    out = _cli("train", spec, "--out", root / "one", "--device", "cpu", "--no-progress", "--log-every", "1")
    chunked = [p for p in json.loads(_cli("compile", spec, "--json"))["stages"][0]["passes"]
               if p["name"] == "chunked_vocab"][0]
    assert chunked["details"]["chunked"] == ["ce", "kd"] and chunked["details"]["logits_dropped"]
    recs = _records(root / "one")
    ev = [r for r in recs if r["event"] == "eval"][-1]
    assert ev["task"] == "lm" and 1 < ev["perplexity"] < V and ev["kl_to_teacher"] > 0
    assert ev["bits_per_token"] == pytest.approx(torch.tensor(ev["perplexity"]).log2().item(), rel=1e-6)
    assert ev["tokens_per_s"] > 0 and ev["positions_per_s"] >= ev["tokens_per_s"]
    assert "perplexity" in out
    student = json.loads((root / "one" / "results.json").read_text())["student"]  # what kdgraph bench reads
    assert student["perplexity"] == ev["perplexity"] and student["kl_to_teacher"] == ev["kl_to_teacher"]
    one = [r for r in recs if r["event"] == "train"]
    assert len(one) == 2 and all(r["positions_per_s"] > 0 for r in one)  # 8 packed rows, 2 steps of 4
    # 2 micro-batches of 2 rows per optimizer step: the same weights (the step's token count normalises)
    _cli("train", spec, "--out", root / "accum", "--device", "cpu", "--no-progress", "--log-every", "1",
         "--set", "stages.main.batch_size=2", "--set", "stages.main.accumulate=2")
    _close(_student(root / "accum"), _student(root / "one"))
    # (chunked CE and sparse-teacher KL against their dense forward: tests/test_chunked_vocab.py)


def test_cache_teacher_on_text_then_train_from_the_cache_chunked(lm, tok_dir):  # noqa: F811
    from kdgraph.methods.token_sparse import sparse_forward_kl, sparse_from_logits
    from kdgraph.spec import load_spec
    from kdgraph.train.data.text import text_datasets

    root, write, teacher = lm
    k = 16
    spec = write("cached", teacher_cache=str(root / "cache"), teacher_cache_tap="teacher:lm_head")
    # --tokenizer names the data's own tokenizer folder: the same fingerprint as the text data set's own identity
    _cli("cache-teacher", spec, "--topk", k, "--out", root / "cache", "--tokenizer", tok_dir, "--batch-size", 3)
    manifest = json.loads((root / "cache" / "manifest.json").read_text())
    assert manifest["data"]["packing"]["packing"] is True and manifest["tokenizer"]["files"] >= 1
    # one step over the 8 rows at an lr too small to move a weight: last.pt holds the weights the step saw
    _cli("train", spec, "--out", root / "from_cache", "--device", "cpu", "--no-progress", "--log-every", "1",
         "--set", "stages.main.batch_size=8", "--set", "stages.main.optimizer.lr=1e-30")
    (step,) = [r for r in _records(root / "from_cache") if r["event"] == "train"]
    rows, _, _, _ = text_datasets(load_spec(spec))
    batch = rows.get_batch(range(len(rows)))
    student = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**STUDENT)).eval()
    student.load_state_dict(_student(root / "from_cache"))
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    with torch.no_grad():
        s_logits, t_logits = student(**inputs).logits, teacher(**inputs).logits
    keep = batch["labels"][:, 1:] != -100
    s, targets = s_logits[:, :-1][keep], batch["labels"][:, 1:][keep]
    top = sparse_from_logits(t_logits[:, :-1][keep], k, 1.0)  # the live teacher's top-K support
    top.logp = top.logp.to(torch.bfloat16)  # as the cache stores it
    kd = sparse_forward_kl(s, top, 1.0).mean()
    want = 0.5 * F.cross_entropy(s, targets) + 0.5 * kd
    assert step["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert step["terms"]["kd"] == pytest.approx(0.5 * kd.item(), rel=1e-5) and kd > 0  # terms are weighted


def test_on_policy_on_text_counts_the_generated_tokens(lm, monkeypatch, tmp_path):
    from kdgraph.distiller.module import Distiller
    from kdgraph.train import train
    from kdgraph.train.on_policy import OnPolicy

    root, write, _ = lm
    spec = json.loads(write("on_policy", packing=False).read_text())
    spec["stages"][0].update(batch_size=2, accumulate=2,
                             on_policy={"fraction": 1.0, "max_new_tokens": 4, "prompt_tokens": 3, "temperature": 0})
    generated, counted = [], []
    count, call = Distiller.count_tokens, OnPolicy.__call__

    def spy_call(self, *args, **kw):
        out = call(self, *args, **kw)
        generated.append(out[1].clone())
        return out

    def spy_count(self, labels):
        counted.append(labels.clone())
        return count(self, labels)
    monkeypatch.setattr(OnPolicy, "__call__", spy_call)
    monkeypatch.setattr(Distiller, "count_tokens", spy_count)
    train(spec, out=tmp_path / "run", device="cpu", progress=False)
    events = [r for r in _records(tmp_path / "run") if r["event"] == "on_policy"]
    assert len(events) == len(generated) == 4 and all(0 < r["generated_tokens"] <= 8 for r in events)
    assert sum(r["generated_tokens"] for r in events) == events[-1]["stage_generated_tokens"]
    # the step's token count (num_tokens) read the generated labels, each window's two micro-batches
    assert len(counted) == 4 and all(torch.equal(c, g) for c, g in zip(counted, generated))
    assert all(int((g != -100).sum()) == r["generated_tokens"] for g, r in zip(generated, events))


def test_export_hf_of_the_trained_student_gives_its_logits(lm):
    root, write, _ = lm
    run = root / "one"  # trained by the first test; trained here when run alone
    if not (run / "last.pt").exists():
        _cli("train", write("chunked"), "--out", run, "--device", "cpu", "--no-progress")
    _cli("export", run / "last.pt", "--hf", "--out", root / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf"), local_files_only=True).eval()
    student = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**STUDENT)).eval()
    student.load_state_dict(_student(run))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied, as trained
    tok = transformers.AutoTokenizer.from_pretrained(str(root / "hf"), local_files_only=True)  # the data's tokenizer
    ids = tok([" ".join(WORDS.split()[:10]), "emma said she could not"], padding="max_length", max_length=T,
              return_tensors="pt")
    with torch.no_grad():
        got = loaded(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        want = student(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_eval_of_a_text_spec_reports_perplexity(lm):
    """kdgraph eval on text: the trained student's held-out perplexity as its run's last evaluation said, and the
    teacher's (no training rows are built: the tokenizer is never handed an empty batch)."""
    root, write, _ = lm
    spec, run = write("chunked"), root / "one"
    if not (run / "last.pt").exists():
        _cli("train", spec, "--out", run, "--device", "cpu", "--no-progress")
    got = json.loads(_cli("eval", spec, "--ckpt", run / "last.pt", "--json"))
    ev = [r for r in _records(run) if r["event"] == "eval"][-1]
    assert got["task"] == "lm" and got["perplexity"] == pytest.approx(ev["perplexity"], rel=1e-6)
    assert "held-out scored tokens" in got["data"]
    text = _cli("eval", spec, "--model", "teacher")
    assert text.startswith("teacher ") and "perplexity" in text and " rows of text " in text
