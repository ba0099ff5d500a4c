"""hf:CLASS model references: built from inline / folder configs, weights from save_pretrained folders and
safetensors files with strict key checks, and the refusals an untrusted spec meets."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import transformers
from safetensors.torch import save_file

import kdgraph
from kdgraph.errors import ModelError
from kdgraph.models import build_model
from kdgraph.spec import ModelRef
from kdgraph.models.weights import load_weights

TINY = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 37, "vocab_size": 99, "max_position_embeddings": 64, "num_labels": 3}


def _ref(**kw) -> ModelRef:
    return ModelRef(**{"model": "hf:AutoModelForSequenceClassification", "kwargs": {"config": dict(TINY)}, **kw})


def _ids(n=4, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 99, (n, length), generator=g),
            "attention_mask": torch.ones(n, length, dtype=torch.long),
            "token_type_ids": torch.zeros(n, length, dtype=torch.long)}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_inline_config_builds_the_transformers_class_with_random_init():
    torch.manual_seed(0)
    a = build_model(_ref(), "student")
    b = build_model(_ref(), "student")
    assert type(a) is transformers.BertForSequenceClassification
    assert a.config.num_labels == 3 and a.config.hidden_size == 32 and len(a.bert.encoder.layer) == 2
    assert _logits(a, _ids()).shape == (4, 3)
    assert not torch.equal(a.classifier.weight, b.classifier.weight)  # random init, nothing loaded


def test_model_class_by_name_and_kwargs_override_the_config():
    ref = ModelRef(model="hf:BertForSequenceClassification", kwargs={"config": dict(TINY), "num_labels": 1})
    m = build_model(ref, "teacher")
    assert type(m) is transformers.BertForSequenceClassification and m.config.num_labels == 1
    assert m.classifier.out_features == 1


def test_config_folder_relative_to_the_spec_file(tmp_path):
    cfg = transformers.AutoConfig.for_model(**TINY)
    (tmp_path / "cfg").mkdir()
    cfg.save_pretrained(tmp_path / "cfg")
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(
        "name: s\ninput: {num_classes: 3, named: {input_ids: {shape: [8], dtype: int64, high: 99}}}\n"
        "teacher: {model: 'hf:AutoModelForSequenceClassification', kwargs: {config: ./cfg}}\n"
        "student: {model: 'hf:AutoModelForSequenceClassification', kwargs: {config: ./cfg, num_labels: 2}}\n"
        "stages: [{name: main, optimizer: {type: adamw, lr: 1.0e-4}, losses: [{type: cross_entropy}]}]\n")
    spec = kdgraph.load_spec(spec_file)
    assert spec.teacher.kwargs["config"] == str((tmp_path / "cfg").resolve())
    assert build_model(spec.teacher, "teacher").config.num_labels == 3
    assert build_model(spec.student, "student").config.num_labels == 2


def test_save_pretrained_folder_and_safetensors_file_load_exactly(tmp_path):
    torch.manual_seed(1)
    src = build_model(_ref(), "teacher")
    src.save_pretrained(tmp_path / "folder")
    assert (tmp_path / "folder" / "model.safetensors").is_file()
    for w in (tmp_path / "folder", tmp_path / "folder" / "model.safetensors"):
        dst = build_model(_ref(weights=str(w)), "teacher")
        assert load_weights(dst, _ref(weights=str(w)), "teacher")
        assert torch.equal(_logits(src, _ids()), _logits(dst, _ids()))


def test_sharded_save_pretrained_folder_loads(tmp_path):
    torch.manual_seed(2)
    src = build_model(_ref(), "teacher")
    src.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    dst = build_model(_ref(), "teacher")
    load_weights(dst, _ref(weights=str(tmp_path / "sharded")), "teacher")
    assert torch.equal(_logits(src, _ids()), _logits(dst, _ids()))


def test_strict_keys_name_missing_and_unexpected(tmp_path):
    src = build_model(_ref(), "teacher")
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("classifier.")}
    sd["cls.predictions.bias"] = torch.zeros(99)
    save_file(sd, str(tmp_path / "backbone.safetensors"))
    with pytest.raises(ModelError) as e:
        load_weights(build_model(_ref(), "student"), _ref(weights=str(tmp_path / "backbone.safetensors")), "student")
    msg = str(e.value)
    assert "2 missing" in msg and "classifier.weight" in msg and "cls.predictions.bias" in msg
    assert "save_pretrained" in msg


def test_legacy_layernorm_names_are_renamed(tmp_path):
    torch.manual_seed(3)
    src = build_model(_ref(), "teacher")
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in src.state_dict().items()}
    assert any(k.endswith("gamma") for k in sd)
    save_file(sd, str(tmp_path / "old.safetensors"))
    dst = build_model(_ref(), "teacher")
    load_weights(dst, _ref(weights=str(tmp_path / "old.safetensors")), "teacher")
    assert torch.equal(_logits(src, _ids()), _logits(dst, _ids()))


@pytest.mark.parametrize("name", ["AutoTokenizer", "PreTrainedModel", "pipeline", "os", "BertConfig", "logging"])
def test_only_model_classes_are_looked_up(name):
    with pytest.raises(ModelError, match="not a transformers model class"):
        build_model(ModelRef(model=f"hf:{name}", kwargs={"config": dict(TINY)}), "student")


@pytest.mark.parametrize("kwargs", [{"config": dict(TINY), "trust_remote_code": True},
                                    {"config": {**TINY, "auto_map": {"AutoModel": "x.Y"}}},
                                    {"config": dict(TINY), "cache_dir": "/tmp"}])
def test_remote_code_and_hub_arguments_are_refused(kwargs):
    with pytest.raises(ModelError, match="not allowed for an hf: model"):
        build_model(ModelRef(model="hf:AutoModelForSequenceClassification", kwargs=kwargs), "student")


def test_hub_names_and_auto_map_folders_are_refused(tmp_path):
    with pytest.raises(ModelError, match="never downloads"):
        build_model(ModelRef(model="hf:AutoModel", kwargs={"config": "bert-base-uncased"}), "student")
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {"AutoModel": "m.M"}}))
    with pytest.raises(ModelError, match="auto_map"):
        build_model(ModelRef(model="hf:AutoModel", kwargs={"config": str(tmp_path / "remote")}), "student")
    with pytest.raises(ModelError, match="never downloads"):
        load_weights(build_model(_ref(), "student"), _ref(weights="bert-base-uncased"), "student")


def test_config_errors_name_the_field():
    with pytest.raises(ModelError, match=r"student.kwargs.config is missing"):
        build_model(ModelRef(model="hf:AutoModel", kwargs={}), "student")
    with pytest.raises(ModelError, match=r"model_type: 'bertt'.*bert"):
        build_model(ModelRef(model="hf:AutoModel", kwargs={"config": {**TINY, "model_type": "bertt"}}), "student")


def test_without_transformers_a_clear_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelError, match=r"pip install 'kdgraph\[hf\]'"):
        build_model(_ref(), "teacher")


def _checkpoint(tmp_path, student_model="hf:AutoModelForSequenceClassification"):
    from kdgraph.train.checkpoint import Checkpoint

    torch.manual_seed(4)
    spec = kdgraph.load_spec({
        "name": "hf_export", "input": {"num_classes": 3, "named": {"input_ids": {"shape": [8], "dtype": "int64",
                                                                                   "high": 99}}},
        "teacher": {"model": "hf:AutoModelForSequenceClassification", "kwargs": {"config": dict(TINY)}},
        "student": {"model": student_model, "kwargs": {"config": dict(TINY)}},
        "stages": [{"name": "main", "optimizer": {"type": "adamw", "lr": 1e-4}, "losses": [{"type": "cross_entropy"}]}]})
    student = build_model(spec.student, "student")
    with torch.no_grad():  # weights no fresh model has: the export must carry them
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    Checkpoint(spec_name=spec.name, spec=spec.model_dump(mode="json"), stage_names=["main"], distiller={},
               student=student.state_dict(), stage="main", stage_index=0, epoch=0, step=0).save(tmp_path / "last.pt")
    return student


def _cli(*args):
    import subprocess

    return subprocess.run([sys.executable, "-m", "kdgraph", *args], capture_output=True, text=True, timeout=120)


def test_export_hf_folder_round_trips_through_from_pretrained(tmp_path):
    student = _checkpoint(tmp_path)
    res = _cli("export", str(tmp_path / "last.pt"), "-o", str(tmp_path / "hf_student"), "--hf")
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and (tmp_path / "hf_student" / "config.json").is_file()
    loaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "hf_student"), local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(loaded) is type(student) and loaded.config.num_labels == 3
    assert torch.equal(_logits(student, _ids()), _logits(loaded, _ids()))
    # the folder is also a kdgraph weights reference
    again = build_model(_ref(), "student")
    load_weights(again, _ref(weights=str(tmp_path / "hf_student")), "student")
    assert torch.equal(_logits(student, _ids()), _logits(again, _ids()))


def test_export_safetensors_of_an_hf_student_and_hf_refusals(tmp_path):
    student = _checkpoint(tmp_path)
    res = _cli("export", str(tmp_path / "last.pt"), "-o", str(tmp_path / "s.safetensors"))
    assert res.returncode == 0, res.stderr
    assert "checked against hf:AutoModelForSequenceClassification (strict)" in res.stdout
    fresh = build_model(_ref(), "student")
    load_weights(fresh, _ref(weights=str(tmp_path / "s.safetensors")), "student")
    assert torch.equal(_logits(student, _ids()), _logits(fresh, _ids()))
    from kdgraph.train.export import export_student

    torch.save(student.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(kdgraph.errors.CheckpointError, match="--hf needs a kdgraph checkpoint"):
        export_student(tmp_path / "plain.pt", tmp_path / "x", hf=True)
