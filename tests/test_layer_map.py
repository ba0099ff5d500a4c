"""Layer maps between networks of different depth through for_each: teacher layer 2i+1 -> student layer i, each
through its own learned projection (connector, layer: linear, flatten: false), plus the attention maps (eager
attention exposes its softmax as a tap). Reference: the eager networks' forward hooks and hand-written MSEs."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import kdgraph
from kdgraph.errors import SpecError, TapError

LLAMA = {"model_type": "llama", "vocab_size": 128, "num_attention_heads": 4, "max_position_embeddings": 64,
         "use_cache": False, "attn_implementation": "eager"}
SPEC = """\
name: tiny_llama_layer_map
input:
  named:
    input_ids: {shape: [16], dtype: int64, high: 128}
    attention_mask: {shape: [16], dtype: int64}
teacher: {model: "hf:AutoModelForCausalLM", kwargs: {config: TEACHER}}
student: {model: "hf:AutoModelForCausalLM", kwargs: {config: STUDENT}}
adapters:
  proj_{i}:
    for_each: {i: [0, 1]}
    type: connector
    inputs: {x: "student:model.layers.{i}"}
    match: "teacher:model.layers.{2*i+1}"
    args: {layer: linear, flatten: false}
stages:
  - name: main
    batch_size: 2
    optimizer: {type: adamw, lr: 1.0e-3}
    train: [student, "proj_{i}"]
    losses:
      - {name: kd, type: token_kl, inputs: {student: "student:lm_head", teacher: "teacher:lm_head"}}
      - {name: hidden, type: mse, for_each: {i: [0, 1]}, weight: WEIGHT,
         inputs: {student: "adapter:proj_{i}", teacher: "teacher:model.layers.{2*i+1}"}}
      - {name: attn, type: mse, for_each: {i: [0, 1]},
         inputs: {student: "student:model.layers.{i}.self_attn/softmax",
                  teacher: "teacher:model.layers.{2*i+1}.self_attn/softmax"}}
data: {dataset: synthetic}
"""


HIDDEN = "      - {name: hidden, type: mse, for_each: {i: [0, 1]}, weight: 0.5,"


def _text(t_layers=4, s_layers=2, weight="0.5"):
    import json
    teacher = {**LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": t_layers}
    student = {**LLAMA, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": s_layers}
    return SPEC.replace("TEACHER", json.dumps(teacher)).replace("STUDENT", json.dumps(student)) \
        .replace("WEIGHT", weight)


def test_for_each_expands_into_ordinary_entries():
    spec = kdgraph.load_spec(_text())
    assert list(spec.adapters) == ["proj_0", "proj_1"]
    assert spec.adapters["proj_1"].inputs == {"x": "student:model.layers.1"}
    assert spec.adapters["proj_1"].match == "teacher:model.layers.3"
    stage = spec.stages[0]
    assert stage.train == ["student", "proj_0", "proj_1"]
    assert [ls.name for ls in stage.losses] == ["kd", "hidden_0", "hidden_1", "attn_0", "attn_1"]
    assert stage.losses[4].inputs["teacher"] == "teacher:model.layers.3.self_attn/softmax"
    # an override addresses an expansion like any loss
    assert kdgraph.apply_overrides(spec, ["stages.main.losses.hidden_1.weight=2"]).stages[0].losses[2].weight == 2


@pytest.mark.parametrize("bad, message", [
    ("for_each: {i: [0, 1]}, weight: -x", f"line {_text().splitlines().index(HIDDEN) + 1}"),  # the template's
    ("for_each: {i: [0, 1], j: [0]}, weight: 1", "different lengths"),
    ("for_each: {i: [0, 1.5]}, weight: 1", "list of integers"),
])
def test_for_each_errors_name_the_template(bad, message):
    text = _text().replace("for_each: {i: [0, 1]}, weight: 0.5", bad)
    with pytest.raises(SpecError, match=message) as e:
        kdgraph.load_spec(text)
    assert "stages[0].losses" in str(e.value)


@pytest.mark.parametrize("expr, message", [
    ("{__import__('os').getpid()}", "only integers"),
    ("{k+1}", "'k' is not a for_each variable"),
    ("{i**99}", "only integers"),
    ("{2*i+}", "not an integer expression"),
])
def test_placeholders_are_integer_arithmetic_only(expr, message):
    text = _text().replace('teacher: "teacher:model.layers.{2*i+1}"}}', f'teacher: "teacher:model.layers.{expr}"}}}}')
    assert expr in text
    with pytest.raises(SpecError, match=message):
        kdgraph.load_spec(text)


@pytest.fixture(scope="module")
def distiller():
    torch.manual_seed(0)
    return kdgraph.compile(_text())


def _hooked(net, names, **kw):
    seen = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda _m, _i, o, n=n: seen.__setitem__(n, o))
             for n in names]
    try:
        out = net(**kw)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def test_layer_map_terms_and_gradients_equal_eager(distiller):
    d = distiller
    assert [a.name for a in d.report.adapters] == ["proj_0", "proj_1"]
    assert all(a.trainable and a.output_shape[-1] == 64 for a in d.report.adapters)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 16), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    out = d(batch)
    kw = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
    layers = ["model.layers.0", "model.layers.1", "model.layers.0.self_attn", "model.layers.1.self_attn"]
    s, _ = _hooked(d.student, layers, **kw)
    with torch.no_grad():
        t, _ = _hooked(d.teacher, ["model.layers.1", "model.layers.3", "model.layers.1.self_attn",
                                   "model.layers.3.self_attn"], **kw)
    for i in (0, 1):
        proj = d.adapters[f"proj_{i}"]
        hidden = 0.5 * F.mse_loss(proj(s[f"model.layers.{i}"]), t[f"model.layers.{2 * i + 1}"])
        torch.testing.assert_close(out.terms[f"hidden_{i}"], hidden)
        # eager attention returns (output, weights): the weights are the softmax the tap reads
        attn = F.mse_loss(s[f"model.layers.{i}.self_attn"][1], t[f"model.layers.{2 * i + 1}.self_attn"][1])
        torch.testing.assert_close(out.terms[f"attn_{i}"], attn)
        (g_ref,) = torch.autograd.grad(hidden, proj.linear.weight)
        (g_got,) = torch.autograd.grad(out.terms[f"hidden_{i}"], proj.linear.weight, retain_graph=True)
        torch.testing.assert_close(g_got, g_ref)
        assert g_got.abs().sum() > 0


def test_an_expansion_naming_a_missing_layer_says_did_you_mean():
    teacher = {**LLAMA, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    student = {**LLAMA, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    spec = kdgraph.load_spec(_text()).model_dump()
    spec["teacher"]["kwargs"]["config"], spec["student"]["kwargs"]["config"] = teacher, student
    spec["adapters"] = {}
    spec["stages"][0]["train"] = ["student"]
    spec["stages"][0]["losses"] = [{"name": "hidden", "type": "mse", "for_each": {"i": [0, 1]},
                                    "inputs": {"student": "student:model.layers.0",
                                               "teacher": "teacher:model.layers.{2*i+1}"}}]
    with pytest.raises(TapError, match=r"teacher:model\.layers\.3.*Did you mean: model\.layers\.1"):
        kdgraph.compile(spec)
