"""Causal LMs in and out of kdgraph (issue 25 parts 7-8), on one tiny random Llama pair compiled once, its teacher
read from a GGUF file the test writes (config from the file's metadata, weights dequantised, sha256 pinned):

* on-policy distillation (stages[i].on_policy, kdgraph.train.on_policy): a generated batch keeps its prompt, its
  labels score only the generated tokens, the token loss through the fused graph equals the loss computed by hand on
  those tokens, the draw and the sampling are seeded (and leave the global RNG alone); trained through the trainer's
  step loop, fraction 0 equals a run without on_policy and fraction 1 reproduces itself;
* export: the trained student as a save_pretrained folder (tied embeddings, generation_config, the spec's tokenizer)
  that AutoModelForCausalLM.from_pretrained loads with equal logits.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

import kdgraph
from kdgraph.spec.on_policy_section import OnPolicySpec
from kdgraph.train.on_policy import OnPolicy

from conftest import SPECS
from gguf_writer import write_tiny_gguf

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

V, T, PROMPT = 128, 16, 4
LLAMA = {"model_type": "llama", "vocab_size": V, "num_attention_heads": 4, "max_position_embeddings": 64,
         "use_cache": False}


TEACHER = {**LLAMA, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_key_value_heads": 2}


def _spec(gguf_file, sha256, tokenizer=None):
    return kdgraph.load_spec({
        "name": "tiny_llama_hub",
        "input": {"named": {"input_ids": {"shape": [T], "dtype": "int64", "high": V},
                            "attention_mask": {"shape": [T], "dtype": "int64"}}},
        "teacher": {"model": "hf:AutoModelForCausalLM", "weights": str(gguf_file), "sha256": sha256,
                    "kwargs": {"config": {"gguf": str(gguf_file)}, "use_cache": False}},
        "student": {"model": "hf:AutoModelForCausalLM",
                    "kwargs": {"config": {**LLAMA, "hidden_size": 32, "num_hidden_layers": 2,
                                          "intermediate_size": 64, "tie_word_embeddings": True}}},
        "stages": [{"name": "main", "epochs": 1, "batch_size": 2, "optimizer": {"type": "adamw", "lr": 1e-2},
                    "losses": [{"name": "kd", "type": "token_kl",
                                "inputs": {"student": "student:lm_head", "teacher": "teacher:lm_head"}}]}],
        "data": {"dataset": "synthetic", **({"tokenizer": str(tokenizer)} if tokenizer else {})}})


class Texts(torch.utils.data.Dataset):
    """Random token rows; the first PROMPT tokens are the prompt (labels -100), as a prompt/completion pair."""

    def __init__(self, n=4, seed=0):
        self.ids = torch.randint(3, V, (n, T), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[:PROMPT] = -100
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(T, dtype=torch.long), "labels": labels}


@pytest.fixture(scope="module")
def distiller(tmp_path_factory):
    """The pair compiled once; the teacher's config and weights from a GGUF file of a random Llama."""
    from kdgraph.models.gguf_support import file_sha256

    torch.manual_seed(0)
    source = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**TEACHER)).eval()
    path = tmp_path_factory.mktemp("gguf") / "teacher.gguf"
    write_tiny_gguf(source, path, tokenizer=True)
    d = kdgraph.compile(_spec(path, file_sha256(path)))
    assert d.load_weights() == {"teacher": True, "student": False}
    return d, {k: v.clone() for k, v in d.state_dict().items()}, source


def test_the_gguf_teacher_of_the_compiled_pair_equals_its_source(distiller):
    d, _, source = distiller
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(d.teacher(input_ids=ids).logits, source(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-5)
    assert d.teacher.config.num_key_value_heads == 2 and d.teacher.config.use_cache is False


def _batch():
    items = [Texts()[i] for i in range(2)]
    b = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    return {k: b[k] for k in ("input_ids", "attention_mask")}, b["labels"]


def test_a_generated_batch_keeps_the_prompt_and_scores_only_generated_tokens(distiller):
    d, init, _ = distiller
    d.load_state_dict(init)
    inputs, labels = _batch()
    op = OnPolicy(OnPolicySpec(fraction=1.0, max_new_tokens=8, temperature=1.0), d.student, seed=3)
    d.train()
    rng = torch.get_rng_state()
    new_in, new_lab = op(inputs, labels, epoch=0, step=0)
    assert torch.equal(torch.get_rng_state(), rng)  # sampling ran under its own seed
    assert d.student.training  # generated in eval mode, back in train mode
    ids, mask = new_in["input_ids"], new_in["attention_mask"]
    assert ids.shape == (2, T) and torch.equal(ids[:, :PROMPT], inputs["input_ids"][:, :PROMPT])
    scored = new_lab != -100
    assert not scored[:, :PROMPT].any() and not scored[:, PROMPT + 8:].any()  # prompt and beyond max_new_tokens
    assert scored.sum() == op.generated > 0 and torch.equal(new_lab[scored], ids[scored])
    assert torch.equal(mask.bool(), torch.arange(T).expand(2, T) < PROMPT + scored.sum(1, keepdim=True))
    assert not torch.equal(ids, inputs["input_ids"])  # the data's completion was replaced
    # reproducible: the same seed and step give the same batch; another step another one
    again, lab2 = OnPolicy(op.settings, d.student, seed=3)(inputs, labels, 0, 0)
    assert torch.equal(again["input_ids"], ids) and torch.equal(lab2, new_lab)
    other, _ = OnPolicy(op.settings, d.student, seed=3)(inputs, labels, 0, 1)
    assert not torch.equal(other["input_ids"], ids)
    # the fused graph's token loss covers the generated tokens only: equal to the KL computed by hand on them
    d.eval()
    out = d({**new_in, "labels": new_lab})
    with torch.no_grad():
        zs = d.student(**new_in).logits[:, :-1]
        zt = d.teacher(**new_in).logits[:, :-1]
    keep = new_lab[:, 1:] != -100
    ref = F.kl_div(F.log_softmax(zs[keep], -1), F.log_softmax(zt[keep], -1), log_target=True,
                   reduction="sum") / keep.sum()
    torch.testing.assert_close(out.terms["kd"].detach(), ref, rtol=1e-5, atol=1e-6)
    d.train()


def test_draws_fraction_budget_and_greedy():
    class Dummy(torch.nn.Module):
        def generate(self, **kw):  # pragma: no cover - never called here
            raise AssertionError

    op = OnPolicy(OnPolicySpec(fraction=0.5), Dummy(), seed=7)
    picks = [op.picked(0, s) for s in range(400)]
    assert 150 < sum(picks) < 250 and picks == [OnPolicy(op.settings, Dummy(), seed=7).picked(0, s)
                                                 for s in range(400)]
    assert picks != [OnPolicy(op.settings, Dummy(), seed=8).picked(0, s) for s in range(400)]
    assert not any(OnPolicy(OnPolicySpec(fraction=0.0), Dummy()).picked(0, s) for s in range(50))
    spent = OnPolicy(OnPolicySpec(fraction=1.0, token_budget=10), Dummy())
    spent.generated = 10
    assert not spent.picked(0, 0)
    with pytest.raises(ValueError, match="fraction"):
        OnPolicySpec(fraction=1.5)


def test_greedy_teacher_generation_is_deterministic(distiller):
    d, init, _ = distiller
    d.load_state_dict(init)
    inputs, labels = _batch()
    s = OnPolicySpec(fraction=1.0, max_new_tokens=6, temperature=0.0, generator="teacher", token_budget=7)
    a = OnPolicy(s, d.teacher, seed=1)
    new_in, lab = a(inputs, labels, 0, 0)
    b_in, _ = OnPolicy(s, d.teacher, seed=2)(inputs, labels, 0, 0)
    assert torch.equal(new_in["input_ids"], b_in["input_ids"])  # greedy: the seed does not matter
    assert 0 < (lab != -100).sum() == a.generated <= 6  # the budget: 7 // 2 = 3 tokens a row at most
    again, lab2 = a(inputs, labels, 0, 1)  # 1 token of budget left, less than one a row: the data's batch
    assert a.picked(0, 1) and again is inputs and lab2 is labels


def _train(d, init, tmp_path, on_policy=None, name="run"):
    from kdgraph.train.distributed import DistEnv
    from kdgraph.train.monitor import Monitor
    from kdgraph.train.steps import LoopSettings, RunProgress, SkipCounter, StepLoop, make_stage_run

    d.load_state_dict(init)
    torch.manual_seed(0)
    stage = d.spec.stages[0].model_copy(update={"on_policy": on_policy})
    env = DistEnv()
    run = make_stage_run("main", 0, stage, d, d.student, Texts(), env=env, workers=0, seed=0, amp="off",
                         save=False, evaluate="never", batch_inputs=d.batch_inputs)
    monitor = Monitor(tmp_path / name, progress=False, tensorboard=False)
    StepLoop(env, monitor, LoopSettings(plot=False), RunProgress(started=0.0), SkipCounter()).run_epochs(run, None)
    monitor.close()
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return {k: v.clone() for k, v in d.student.state_dict().items()}, records


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_on_policy_through_the_step_loop(distiller, tmp_path):
    d, init, _ = distiller
    off, _ = _train(d, init, tmp_path, None, "off")
    zero, rec0 = _train(d, init, tmp_path, OnPolicySpec(fraction=0.0), "zero")
    assert _same(off, zero) and not any(r["event"] == "on_policy" for r in rec0)
    on = OnPolicySpec(fraction=1.0, max_new_tokens=8)
    a, rec = _train(d, init, tmp_path, on, "a")
    b, _ = _train(d, init, tmp_path, on, "b")
    assert _same(a, b) and not _same(a, off)
    gen = [r for r in rec if r["event"] == "on_policy"]
    assert [r["step"] for r in gen] == [0, 1] and all(r["generated_tokens"] > 0 and r["tokens_per_s"] for r in gen)
    assert gen[-1]["stage_generated_tokens"] == sum(r["generated_tokens"] for r in gen)


def _tiny_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(str(folder))


def test_export_round_trips_through_from_pretrained(distiller, tmp_path):
    from kdgraph.train.checkpoint import Checkpoint
    from kdgraph.train.export import export_student

    d, init, _ = distiller
    trained, _ = _train(d, init, tmp_path, None, "export")  # two steps through the fused graph
    assert not _same(trained, {k: init[f"student.{k}"] for k in trained})
    gguf_file = d.spec.teacher.weights
    spec = _spec(gguf_file, d.spec.teacher.sha256, tokenizer=gguf_file)  # the teacher's tokenizer, from its GGUF
    Checkpoint(spec_name=spec.name, spec=spec.model_dump(mode="json"), stage_names=["main"], distiller={},
               student=trained, stage="main", stage_index=0, epoch=0, step=2).save(tmp_path / "last.pt")
    res = export_student(tmp_path / "last.pt", tmp_path / "hf", hf=True)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(res["files"])
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), local_files_only=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied, as trained
    assert loaded.config.use_cache is True
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    d.eval()
    with torch.no_grad():
        want = d.student(input_ids=ids).logits
        got = loaded.eval()(input_ids=ids).logits
    d.train()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert tok.convert_ids_to_tokens(tok("emma abc")["input_ids"]) == ["emma", "\u0120", "abc"]
    assert tok.eos_token == "</s>"
    # a tokenizer folder (save_pretrained) is copied the same way
    _tiny_tokenizer(tmp_path / "tok")
    spec = _spec(gguf_file, d.spec.teacher.sha256, tokenizer=tmp_path / "tok")
    Checkpoint(spec_name=spec.name, spec=spec.model_dump(mode="json"), stage_names=["main"], distiller={},
               student=trained, stage="main", stage_index=0, epoch=0, step=2).save(tmp_path / "last2.pt")
    res = export_student(tmp_path / "last2.pt", tmp_path / "hf2", hf=True)
    assert res["notes"][-1] == f"tokenizer copied from {tmp_path / 'tok'}"
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf2"), local_files_only=True)
    assert tok("w5 w7")["input_ids"] == [5, 7]
    # the GLUE case (a sequence classifier) is covered by tests/test_hf_models.py::test_export_hf_folder_round_trips


def test_on_policy_refusals_before_any_step(distiller):
    from types import SimpleNamespace

    from kdgraph.errors import TrainingError
    from kdgraph.train.on_policy import on_policy_for_stage

    d, _, _ = distiller
    stage = d.spec.stages[0].model_copy(update={"on_policy": OnPolicySpec()})
    assert isinstance(on_policy_for_stage(stage, d, 0, 0, 0), OnPolicy)
    assert on_policy_for_stage(d.spec.stages[0], d, 0, 0, 0) is None
    image_task = SimpleNamespace(spec=kdgraph.load_spec(SPECS / "kd_resnet18.yaml"), student=torch.nn.Linear(2, 2))
    with pytest.raises(TrainingError, match=r"stages\[0\].on_policy: the student \(Linear\) has no generate"):
        on_policy_for_stage(stage, image_task, 0, 0, 0)
    sharded = d.spec.model_copy(deep=True)
    sharded.runtime.distributed = "fsdp"
    with pytest.raises(TrainingError, match="fsdp shards"):
        on_policy_for_stage(stage, SimpleNamespace(spec=sharded, student=d.student), 0, 0, 0)
    inputs, labels = _batch()
    packed = {**inputs, "position_ids": torch.cat([torch.arange(6), torch.arange(T - 6)]).expand(2, T)}
    with pytest.raises(TrainingError, match="packed documents"):
        OnPolicy(OnPolicySpec(fraction=1.0), d.student)(packed, labels, 0, 0)
    plain = {**inputs, "position_ids": torch.arange(T).expand(2, T)}
    out, _ = OnPolicy(OnPolicySpec(fraction=1.0, max_new_tokens=2), d.student)(plain, labels, 0, 0)
    assert list(out) == ["input_ids", "attention_mask", "position_ids"] and torch.equal(out["position_ids"],
                                                                                       plain["position_ids"])
    replayed = SimpleNamespace(spec=d.spec, student=d.student, report=SimpleNamespace(
        cached_taps={"teacher:lm_head": "teacher_output"}))
    with pytest.raises(TrainingError, match="the teacher must score them live"):
        on_policy_for_stage(stage, replayed, 0, 0, 0)


def test_generation_uses_the_key_value_cache_even_with_use_cache_false_in_the_config():
    cfg = transformers.AutoConfig.for_model(**{**LLAMA, "hidden_size": 32, "num_hidden_layers": 1,
                                               "intermediate_size": 64})
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    assert m.config.use_cache is False  # as a spec sets it for capture
    lengths = []
    hook = m.model.embed_tokens.register_forward_hook(lambda mod, i, o: lengths.append(i[0].shape[1]))
    inputs, labels = _batch()
    OnPolicy(OnPolicySpec(fraction=1.0, max_new_tokens=5, temperature=0.0), m)(inputs, labels, 0, 0)
    hook.remove()
    assert lengths[0] == PROMPT and set(lengths[1:]) == {1}  # the prompt once, then one token a step
