"""GGUF teachers (kdgraph.models.gguf_support): a tiny Llama written as GGUF by the test (gguf's GGUFWriter, llama.cpp's
tensor names and its q/k permutation, as convert_hf_to_gguf.py writes them), loaded as a teacher whose config comes
from the file's metadata: logits equal the source network's; the file's sha256 pinned and checked; pkg: references."""
from __future__ import annotations

import pytest
import torch

import kdgraph
from kdgraph.errors import ModelError
from kdgraph.models import build_model
from kdgraph.models.weights import load_weights
from kdgraph.spec import ModelRef

from gguf_writer import write_tiny_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

CFG = {"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
       "rope_theta": 10000.0, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    torch.manual_seed(0)
    src = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**CFG)).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(src, path)
    return src, path


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_gguf_teacher_config_and_weights_equal_the_source(tiny_gguf):
    from kdgraph.models.gguf_support import file_sha256

    src, path = tiny_gguf
    ref = ModelRef(model="hf:AutoModelForCausalLM", weights=str(path), sha256=file_sha256(path),
                   kwargs={"config": {"gguf": str(path)}, "use_cache": False})
    torch.manual_seed(1)
    teacher = build_model(ref, "teacher")
    c = teacher.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.vocab_size) == \
        ("llama", 32, 2, 2, 96)
    assert c.tie_word_embeddings and c.use_cache is False
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(_logits(teacher, ids), _logits(src, ids))  # random init before loading
    assert load_weights(teacher, ref, "teacher")
    torch.testing.assert_close(_logits(teacher, ids), _logits(src, ids), rtol=1e-5, atol=1e-5)
    assert teacher.lm_head.weight.data_ptr() == teacher.model.embed_tokens.weight.data_ptr()  # still tied


@pytest.mark.filterwarnings("ignore:teacher.weights. junk.gguf")
def test_gguf_sha256_mismatch_refused_before_reading(tiny_gguf, tmp_path):
    _, path = tiny_gguf
    bad = ModelRef(model="hf:AutoModelForCausalLM", weights=str(path), sha256="0" * 64,
                   kwargs={"config": dict(CFG)})
    model = build_model(bad, "teacher")
    with pytest.raises(ModelError, match=r"teacher.weights: .*does not match the spec's sha256"):
        load_weights(model, bad, "teacher")
    with pytest.warns(UserWarning, match="read unverified .*pin it with sha256: [0-9a-f]{64}"):
        load_weights(model, ModelRef(model="hf:AutoModelForCausalLM", weights=str(path),
                                     kwargs={"config": dict(CFG)}), "teacher")
    with pytest.raises(kdgraph.errors.SpecError, match="sha256"):
        kdgraph.load_spec({"name": "x", "teacher": {"model": "hf:AutoModelForCausalLM", "sha256": "abc"},
                           "student": {"model": "torchvision:resnet18"},
                           "stages": [{"name": "m", "optimizer": {"type": "sgd", "lr": 0.1},
                                       "losses": [{"type": "kd"}]}]})
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 4)
    with pytest.raises(ModelError, match="cannot be read as a GGUF model"):
        load_weights(model, ModelRef(model="hf:AutoModelForCausalLM", weights=str(junk),
                                     kwargs={"config": dict(CFG)}), "teacher")


def test_pkg_references_stay_inside_an_installed_package(tmp_path):
    from kdgraph.models.gguf_support import resolve_local

    assert resolve_local("pkg:kdgraph/models/pretrained/SHA256SUMS", "w").name == "SHA256SUMS"
    with pytest.raises(ModelError, match="leaves the package folder"):
        resolve_local("pkg:kdgraph/../README.md", "w")
    with pytest.raises(ModelError, match="no installed package 'no_such_pkg_xyz'"):
        resolve_local("pkg:no_such_pkg_xyz/a.gguf", "w")
    with pytest.raises(ModelError, match="holds"):
        resolve_local("pkg:kdgraph/missing.gguf", "w")
    with pytest.raises(ModelError, match="is not a file"):
        resolve_local(str(tmp_path / "none.gguf"), "w")


def test_relative_gguf_paths_resolve_against_the_spec_file(tmp_path):
    (tmp_path / "nets").mkdir()
    (tmp_path / "spec.yaml").write_text(
        "name: g\n"
        "input: {named: {input_ids: {shape: [8], dtype: int64, high: 96}}}\n"
        "teacher: {model: 'hf:AutoModelForCausalLM', weights: ./nets/t.gguf, kwargs: {config: {gguf: ./nets/t.gguf}}}\n"
        "student: {model: 'hf:AutoModelForCausalLM', kwargs: {config: {model_type: llama}}}\n"
        "stages: [{name: m, optimizer: {type: adamw, lr: 0.001}, losses: [{type: token_kl}]}]\n")
    spec = kdgraph.load_spec(tmp_path / "spec.yaml")
    want = str((tmp_path / "nets" / "t.gguf").resolve())
    assert spec.teacher.weights == want and spec.teacher.kwargs["config"]["gguf"] == want


def test_sha256_pins_any_weights_file(tiny_gguf, tmp_path):
    from safetensors.torch import save_file

    from kdgraph.models.gguf_support import file_sha256

    src, _ = tiny_gguf
    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items() if k != "lm_head.weight"}, str(f))
    ref = dict(model="hf:AutoModelForCausalLM", weights=str(f), kwargs={"config": dict(CFG)})
    model = build_model(ModelRef(**ref), "student")
    good = file_sha256(f)
    assert load_weights(model, ModelRef(**ref, sha256=good.upper()), "student")
    f.write_bytes(f.read_bytes()[:-4] + b"\0\0\0\0")  # rotted bytes in a tensor: safetensors would read them
    with pytest.raises(ModelError, match="student.weights: .*does not match the spec's sha256"):
        load_weights(model, ModelRef(**ref, sha256=good), "student")
    with pytest.raises(ModelError, match="pins one weights file"):
        load_weights(model, ModelRef(**{**ref, "weights": str(tmp_path)}, sha256="1" * 64), "student")
