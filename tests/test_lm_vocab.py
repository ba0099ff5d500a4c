"""Vocabulary handling of the token losses: two tokenizers refused (tokenizer folders, config special ids,
embedding sizes), padded embeddings accepted with args.vocab_size, and specs/lm/tiny_llama.yaml through
`kdgraph compile` (exit 0) and a tokenizer mismatch through it (exit 2, one paragraph, no traceback).
Tokenizer folders are written by the test with the `tokenizers` package (tokenizer.json, as save_pretrained)."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

import kdgraph
from kdgraph.cli import main
from kdgraph.compiler.vocabulary import check_vocabularies, tokenizer_vocabulary
from kdgraph.errors import SpecError
from kdgraph.models import build_model
from conftest import SPECS

SPEC = SPECS / "lm" / "tiny_llama.yaml"


def _tokenizer(folder, words):
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    Tokenizer(WordLevel(vocab, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    return str(folder)


def _raw(**config):
    raw = yaml.safe_load(SPEC.read_text())
    for role in ("teacher", "student"):  # 1 layer each: the checks read configs, nothing is captured
        raw[role]["kwargs"]["config"].update(num_hidden_layers=1)
    for role, cfg in config.items():
        raw[role]["kwargs"]["config"].update(cfg)
    return raw


def _check(raw):
    spec = kdgraph.load_spec(raw)
    check_vocabularies(spec, build_model(spec.teacher, "teacher"), build_model(spec.student, "student"))


def test_same_tokenizer_and_padded_embedding_pass(tmp_path):
    words = [f"w{i}" for i in range(255)]
    raw = _raw(teacher={"vocab_size": 320})                                 # teacher embedding padded to 320
    raw["teacher"]["tokenizer"] = _tokenizer(tmp_path / "t", words)
    raw["student"]["tokenizer"] = _tokenizer(tmp_path / "s", words)         # another folder, the same vocabulary
    raw["stages"][0]["losses"][1]["args"]["vocab_size"] = 256
    _check(raw)
    assert tokenizer_vocabulary(raw["student"]["tokenizer"], "x")[5] == "w4"


def test_different_tokenizers_refused(tmp_path):
    raw = _raw()
    raw["teacher"]["tokenizer"] = _tokenizer(tmp_path / "t", [f"w{i}" for i in range(255)])
    raw["data"]["tokenizer"] = _tokenizer(tmp_path / "s", [f"v{i}" for i in range(255)])  # the student's default
    with pytest.raises(SpecError) as e:
        _check(raw)
    msg = str(e.value)
    assert msg.startswith("stages[0].losses[1]: token_kl (kd) compares") and "one tokenizer" in msg
    assert "teacher.tokenizer" in msg and "data.tokenizer" in msg and "id 1 is 'w0' for the teacher and 'v0'" in msg


def test_config_checks(tmp_path):
    with pytest.raises(SpecError, match=r"disagree on eos_token_id: teacher 2, student 7"):
        _check(_raw(student={"eos_token_id": 7}))
    with pytest.raises(SpecError, match=r"teacher's config.vocab_size is 256 and the student's 300.*args.vocab_size"):
        _check(_raw(student={"vocab_size": 300}))
    raw = _raw()
    raw["stages"][0]["losses"][1]["args"]["vocab_size"] = 512
    with pytest.raises(SpecError, match=r"losses\[1\].args.vocab_size: is 512, above the teacher's config.vocab_size"):
        _check(raw)


def test_cli_compiles_the_tiny_llama_spec_and_refuses_a_tokenizer_mismatch(tmp_path):
    r = CliRunner().invoke(main, ["compile", str(SPEC), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    stage = json.loads(r.output)["stages"][0]
    assert {t["tap"] for t in stage["taps"]} >= {"student:lm_head", "teacher:lm_head", "batch:num_tokens"}
    assert stage["optional_batch_inputs"] == ["num_tokens"] and stage["batch_inputs"] == []
    raw = yaml.safe_load(SPEC.read_text())
    _tokenizer(tmp_path / "t", ["a", "b"])
    _tokenizer(tmp_path / "s", ["b", "a"])
    raw["teacher"]["tokenizer"], raw["student"]["tokenizer"] = "./t", "./s"  # relative to the spec file
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(main, ["compile", str(tmp_path / "bad.yaml")])
    assert r.exit_code == 2, r.output
    assert "one tokenizer" in r.output and "id 1 is 'a' for the teacher and 'b' for the student" in r.output
    assert "Traceback" not in r.output
    assert str(tmp_path / "t") in r.output
