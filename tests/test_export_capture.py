"""The torch.export capture backend: a network fx cannot trace, a Hugging Face BERT pair with named (dict) inputs,
and the same torchvision ResNet captured both ways. Values are checked against the eager modules (forward hooks,
hand-written losses), gradients against eager backward passes, training against what must (not) change."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig, BertForSequenceClassification

import kdgraph
from kdgraph.errors import KDGraphError, SpecError, TapError, TraceError


class ShapeBranch(nn.Module):
    """Python control flow on a tensor's shape (fx rejects it, torch.export specializes it); a ReLU module called
    twice (in place), BatchNorm and Dropout (mode-dependent)."""

    def __init__(self, p: float = 0.0, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 1:
            x = x.expand(-1, -1, -1, 2)
        h = self.relu(self.bn(self.conv(x)))
        h = self.relu(self.conv2(h)) + h
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)))


def _spec(losses, **extra):
    return {"name": "shape_branch", "input": {"channels": 3, "size": [8, 8], "num_classes": 5},
            "teacher": {"model": "registered:t"}, "student": {"model": "registered:s"},
            "stages": [{"name": "main", "optimizer": {"lr": 0.05}, "losses": losses}], **extra}


KD_AT = [{"type": "cross_entropy"}, {"name": "kd", "type": "kd", "args": {"temperature": 4.0}},
         {"name": "at", "type": "at", "inputs": {"student": "student:relu#0", "teacher": "teacher:bn"}}]


def _hooked(module: nn.Module, names: list[str], *args, **kwargs) -> tuple[dict[str, list[torch.Tensor]], object]:
    """Every call's output of ``names`` (cloned: in-place modules overwrite), and the module's output."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [module.get_submodule(n).register_forward_hook(
        lambda _m, _i, o, n=n: seen[n].append(o.detach().clone())) for n in names]
    try:
        out = module(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def test_a_network_fx_cannot_trace_is_captured_with_export_and_matches_eager():
    torch.manual_seed(0)
    t, s = ShapeBranch(), ShapeBranch()
    d = kdgraph.compile(_spec(KD_AT), teacher=t, student=s)
    for role in ("teacher", "student"):
        net = d.traced[role]
        assert net.backend == "export" and "control flow" in net.fx_error
    assert d.graph_module.get_parameter("student.conv.weight") is s.conv.weight  # the user's own parameters
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))

    # taps equal forward hooks on the eager modules (teacher in eval mode, student in train mode)
    ref_s = copy.deepcopy(s)
    d.train()
    out = d(x, y, return_taps=True)
    t_seen, t_logits = _hooked(copy.deepcopy(t).eval(), ["bn"], x)
    s_seen, s_logits = _hooked(ref_s.train(), ["relu"], x)
    torch.testing.assert_close(out.taps["teacher:bn"], t_seen["bn"][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.taps["student:relu#0"], s_seen["relu"][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.taps["teacher:@output"], t_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logits, s_logits, rtol=0, atol=1e-6)
    # the BatchNorm call follows train mode: the graph updated the student's running statistics as eager did
    torch.testing.assert_close(s.bn.running_mean, ref_s.bn.running_mean, rtol=0, atol=1e-7)

    # gradients equal a hand-written eager step with the distiller's own loss modules
    ref_s2 = copy.deepcopy(s)
    d.zero_grad()
    out = d(x, y)
    out.loss.backward()
    losses = d.losses["main"]
    with torch.no_grad():
        feats, t_out = _hooked(copy.deepcopy(t).eval(), ["bn"], x)
    s_feats: list[torch.Tensor] = []  # a hook that returns a value would replace the output: append returns None
    h = ref_s2.relu.register_forward_hook(lambda _m, _i, o: s_feats.append(o.clone()))
    logits = ref_s2.train()(x)
    h.remove()
    eager = (losses["cross_entropy"](logits=logits, targets=y) + losses["kd"](student=logits, teacher=t_out)
             + losses["at"](student=s_feats[0], teacher=feats["bn"][0]))
    eager.backward()
    torch.testing.assert_close(out.loss, eager, rtol=1e-6, atol=1e-6)
    for (name, p), p_ref in zip(s.named_parameters(), ref_s2.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert all(p.grad is None for p in t.parameters())


def test_an_exported_graph_follows_eval_mode_and_taps_repeated_calls_and_ops():
    torch.manual_seed(1)
    t, s = ShapeBranch(p=0.5), ShapeBranch(p=0.5)
    spec = _spec([{"type": "cross_entropy"},
                  {"name": "l2", "type": "mse", "inputs": {"student": "student:/add", "teacher": "teacher:/add"}}])
    d = kdgraph.compile(spec, teacher=t, student=s)
    assert "relu#0" in d.traced["student"].all_names() and "relu" in d.traced["student"].all_names()
    x, y = torch.randn(3, 3, 8, 8), torch.randint(0, 5, (3,))
    d.eval()  # Dropout(0.5) is off in eval mode: the graph calls the module, so it is off in the graph too
    with torch.no_grad():
        out = d(x, y, return_taps=True)
        seen, logits = _hooked(s.eval(), ["relu"], x)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.taps["student:/add"], seen["relu"][1] + seen["relu"][0], rtol=0, atol=1e-6)


def test_the_teacher_is_frozen_and_pruned_and_only_the_student_trains():
    torch.manual_seed(2)
    t, s = ShapeBranch(), ShapeBranch()
    spec = _spec([{"type": "cross_entropy"},
                  {"name": "at", "type": "at", "inputs": {"student": "student:bn", "teacher": "teacher:bn"}}])
    d = kdgraph.compile(spec, teacher=t, student=s)
    pruned = {p["tap"] for p in d.report.pruned_nodes if p["tap"]}
    assert {"conv2", "fc", "drop", "/add"} <= pruned, pruned  # nothing after teacher:bn runs
    teacher_state = copy.deepcopy(t.state_dict())
    student_state = copy.deepcopy(s.state_dict())
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
    d.train()
    for _ in range(3):
        out = d(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,)))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(torch.equal(v, t.state_dict()[k]) for k, v in teacher_state.items())  # BN statistics too
    changed = {k for k, v in student_state.items() if not torch.equal(v, s.state_dict()[k])}
    assert {"conv.weight", "fc.weight", "bn.running_mean"} <= changed


def _bert(hidden: int, layers: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


NAMED = {"input_ids": {"shape": [16], "dtype": "int64", "high": 1000},
         "attention_mask": {"shape": [16], "dtype": "int64"}, "token_type_ids": {"shape": [16], "dtype": "int64"}}
BERT_SPEC = {
    "name": "bert_pair", "input": {"num_classes": 3, "named": NAMED},
    "teacher": {"model": "registered:t"}, "student": {"model": "registered:s"},
    "stages": [{"name": "main", "optimizer": {"lr": 0.01}, "losses": [
        {"type": "cross_entropy", "inputs": {"logits": "student:classifier"}},
        {"name": "kd", "type": "kd", "args": {"temperature": 2.0},
         "inputs": {"student": "student:@output", "teacher": "teacher:@output"}},
        {"name": "hidden", "type": "mse", "inputs": {"student": "student:bert.encoder.layer.0.output",
                                                      "teacher": "teacher:bert.encoder.layer.1.output"}}]}]}


def _tokens(batch: int, seq: int, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0  # a padded example
    return {"input_ids": torch.randint(0, 1000, (batch, seq), generator=g), "attention_mask": mask,
            "token_type_ids": torch.randint(0, 2, (batch, seq), generator=g),
            "labels": torch.randint(0, 3, (batch,), generator=g)}


def test_a_bert_pair_with_named_inputs_matches_eager_hooks_and_gradients():
    t, s = _bert(32, 2, 0), _bert(32, 1, 1)
    d = kdgraph.compile(BERT_SPEC, teacher=t, student=s)
    names = d.traced["teacher"].all_names()
    assert {"bert.encoder.layer.0.attention", "bert.encoder.layer.1.output", "classifier"} <= set(names)
    assert d.traced["student"].backend == "export"
    ref = copy.deepcopy(s)
    batch = _tokens(4, 12)  # another batch size and sequence length than captured (2 x 16): sizes stay symbolic
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    d.train()
    out = d(batch, return_taps=True)
    seen, t_out = _hooked(copy.deepcopy(t).eval(), ["bert.encoder.layer.1.output"], **inputs)
    torch.testing.assert_close(out.taps["teacher:bert.encoder.layer.1.output"], seen["bert.encoder.layer.1.output"][0],
                               rtol=0, atol=1e-6)
    out.loss.backward()

    s_seen: list[torch.Tensor] = []
    h = ref.bert.encoder.layer[0].output.register_forward_hook(lambda _m, _i, o: s_seen.append(o))
    logits = ref.train()(**inputs).logits
    h.remove()
    losses = d.losses["main"]
    eager = (losses["cross_entropy"](logits=logits, targets=batch["labels"])
             + losses["kd"](student=logits, teacher=t_out.logits)
             + losses["hidden"](student=s_seen[0], teacher=seen["bert.encoder.layer.1.output"][0]))
    eager.backward()
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, eager, rtol=1e-6, atol=1e-6)
    for (name, p), p_ref in zip(s.named_parameters(), ref.parameters()):
        if p_ref.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert all(p.grad is None for p in t.parameters())


def test_the_same_resnet_captured_with_export_and_fx_gives_the_same_loss():
    torch.manual_seed(4)
    teacher, student = torchvision.models.resnet18(num_classes=5), torchvision.models.resnet18(num_classes=5)
    spec = _spec([{"type": "cross_entropy"}, {"name": "kd", "type": "kd", "args": {"temperature": 4.0}},
                  {"name": "at", "type": "at", "weight": 10.0,
                   "inputs": {"student": "student:layer2.0.bn1", "teacher": "teacher:layer2.0.bn1"}}],
                 input={"channels": 3, "size": [32, 32], "num_classes": 5})
    by = {}
    for backend in ("fx", "export"):
        t, s = copy.deepcopy(teacher), copy.deepcopy(student)
        sp = dict(spec, teacher={"model": "registered:t", "capture": backend},
                  student={"model": "registered:s", "capture": backend})
        d = kdgraph.compile(sp, teacher=t, student=s)
        assert d.traced["student"].backend == backend
        d.train()
        out = d(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)), torch.tensor([1, 3]),
                return_taps=True)
        by[backend] = out
    torch.testing.assert_close(by["export"].loss, by["fx"].loss, rtol=1e-5, atol=1e-6)
    # a tap before an in-place ReLU reads the BatchNorm's output, not the ReLU's (in-place ops made out-of-place)
    assert (by["export"].taps["student:layer2.0.bn1"] < 0).any()
    torch.testing.assert_close(by["export"].taps["student:layer2.0.bn1"], by["fx"].taps["student:layer2.0.bn1"],
                               rtol=1e-5, atol=1e-5)


def test_capture_errors_are_one_clear_paragraph():
    with pytest.raises(TraceError, match="torch.fx cannot trace the student .*control flow"):
        kdgraph.compile(dict(_spec(KD_AT), student={"model": "registered:s", "capture": "fx"}),
                        teacher=ShapeBranch(), student=ShapeBranch())
    with pytest.raises(TraceError, match="takes named inputs .* use capture: export"):
        kdgraph.compile(dict(BERT_SPEC, teacher={"model": "registered:t", "capture": "fx"}),
                        teacher=_bert(32, 2, 0), student=_bert(32, 1, 1))
    with pytest.raises(TapError, match="takes several inputs .*batch:input_ids"):
        spec = copy.deepcopy(BERT_SPEC)
        spec["stages"][0]["losses"][2]["inputs"]["teacher"] = "teacher:@input"
        kdgraph.compile(spec, teacher=_bert(32, 2, 0), student=_bert(32, 1, 1))
    with pytest.raises(SpecError, match="transform acts on images"):
        spec = copy.deepcopy(BERT_SPEC)
        spec["stages"][0]["transform"] = {"type": "sskd_rotations"}
        kdgraph.compile(spec, teacher=_bert(32, 2, 0), student=_bert(32, 1, 1))
    d = kdgraph.compile(BERT_SPEC, teacher=_bert(32, 2, 0), student=_bert(32, 1, 1))
    with pytest.raises(KDGraphError, match=r"unexpected keys \['idx'\]; it takes input_ids, attention_mask, "
                                           r"token_type_ids, labels"):
        d({**_tokens(2, 8), "idx": torch.arange(2)})
    with pytest.raises(KDGraphError, match=r"lacks the named inputs \['token_type_ids'\]"):
        d({k: v for k, v in _tokens(2, 8).items() if k != "token_type_ids"})
    with pytest.raises(KDGraphError, match="declares named inputs"):
        d(torch.randn(2, 3, 8, 8))


class WithConstant(nn.Module):
    """A forward that creates a tensor constant and a tensor on a device (export bakes both in)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 1:
            x = x * 2
        scale = torch.tensor([1.0, 2.0, 3.0, 4.0])
        pos = torch.arange(x.shape[-1], device=x.device, dtype=x.dtype)
        return self.fc((x * scale + pos).flatten(1))


def test_constants_and_devices_the_capture_baked_in_are_rebuilt_from_the_input():
    spec = {"name": "const", "input": {"channels": 1, "size": [1, 4], "num_classes": 3},
            "teacher": {"model": "registered:t"}, "student": {"model": "registered:s"},
            "stages": [{"name": "main", "optimizer": {"lr": 0.1}, "losses": [
                {"type": "cross_entropy"}, {"name": "kd", "type": "kd", "args": {"temperature": 2.0}}]}]}
    torch.manual_seed(6)
    t, s = WithConstant(), WithConstant()
    d = kdgraph.compile(spec, teacher=t, student=s)
    assert d.traced["student"].backend == "export"
    for node in d.graph_module.graph.nodes:  # no device of the capture is left in any op's arguments
        flat = torch.utils._pytree.tree_leaves((node.args, node.kwargs))
        assert not any(isinstance(a, torch.device) for a in flat), node.format_node()
        assert node.target is not torch.ops.aten._assert_tensor_metadata.default
    x = torch.randn(5, 1, 1, 4)
    out = d.eval()(x, torch.randint(0, 3, (5,)))
    torch.testing.assert_close(out.logits, s(x), rtol=0, atol=1e-6)
