"""Token losses over one student head computed together (runtime.chunked_vocab): ``token_ce`` + ``token_kl`` read
each chunk's student logits once, with the values and gradients of each loss alone and of the dense path.

Reference: each loss's own forward on dense logits, fp32; tolerance rtol 1e-5 / atol 1e-6 on values, rtol 1e-4 /
atol 1e-6 on gradients (the chunked sums add in another order), as tests/test_chunked_vocab.py.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

import kdgraph
from kdgraph.compiler.chunked_loss import Dense, Head, chunked_token_loss, chunked_token_losses, head_logits
from kdgraph.methods.token_ce import TokenCE
from kdgraph.methods.token_kl import TokenKL
from kdgraph.methods.token_rkl import TokenRKL
from kdgraph.viz.build import stage_view
from test_chunked_vocab import sparse_case


def _sides(seed=0, vocab=40, hidden=12):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(3, 9, hidden, generator=g, requires_grad=True)
    ws = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    bs = torch.randn(vocab, generator=g, requires_grad=True)
    xt = torch.randn(3, 9, hidden, generator=g)
    wt = torch.randn(vocab + 8, hidden, generator=g)       # a padded teacher vocabulary
    labels = torch.randint(0, 32, (3, 9), generator=g)
    labels[0, :4] = -100
    labels[2, 6:] = -100
    return xs, ws, bs, xt, wt, labels


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_fused_losses_equal_each_alone_and_the_dense_path(chunk):
    xs, ws, bs, xt, wt, labels = _sides(1)
    losses = (TokenCE(vocab_size=32), TokenKL(temperature=1.5, vocab_size=32), TokenRKL(vocab_size=32))
    nums = (torch.tensor(30.0), None, torch.tensor(12.5))   # each loss its own normaliser
    student = Head(xs, ws, bs, 0.5, 3.0)
    teachers = (None, Head(xt, wt), Dense(F.linear(xt, wt)))
    fused = chunked_token_losses(losses, labels, nums, chunk, student, teachers)
    zs, zt = head_logits(xs, ws, bs, 0.5, 3.0), F.linear(xt, wt)
    dense = (losses[0](zs, labels, nums[0]), losses[1](zs, zt, labels, nums[1]), losses[2](zs, zt, labels, nums[2]))
    for loss, t, num, got, want in zip(losses, teachers, nums, fused, dense):
        alone = chunked_token_loss(loss, labels, num, chunk, student, t)
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    mix = (0.5, 0.3, 0.2)
    got = torch.autograd.grad(sum(w * v for w, v in zip(mix, fused)), (xs, ws, bs))
    want = torch.autograd.grad(sum(w * v for w, v in zip(mix, dense)), (xs, ws, bs))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in got)


def test_fused_with_a_cached_top_k_teacher_equals_the_dense_forward():
    x, w, labels, teacher = sparse_case()
    ce, kl = TokenCE(), TokenKL(temperature=2.0)
    got = chunked_token_losses((ce, kl), labels, (None, None), 3, Head(x, w), (None, Dense(teacher)))
    z = x @ w.T
    want = (ce(z, labels), kl(z, teacher, labels))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(torch.autograd.grad(got[0] + got[1], (x, w)), torch.autograd.grad(want[0] + want[1], (x, w))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


class _HeadCalls(TorchFunctionMode):
    """Counts F.linear calls with the student head's weight."""

    def __init__(self, weight):
        super().__init__()
        self.weight, self.calls = weight, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and len(args) > 1 and args[1] is self.weight:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_fused_losses_compute_each_chunk_of_student_logits_once():
    xs, ws, bs, xt, wt, labels = _sides(2)
    losses, teachers = (TokenCE(), TokenKL()), (None, Head(xt, wt[:40]))   # no slice: the head is `ws` itself
    kept = int((labels[:, 1:] != -100).sum())
    chunks = -(-kept // 4)
    counts = []
    for run in ("fused", "separate"):
        with _HeadCalls(ws) as mode:
            if run == "fused":
                total = sum(chunked_token_losses(losses, labels, (None, None), 4, Head(xs, ws, bs), teachers))
            else:
                total = sum(chunked_token_loss(loss, labels, None, 4, Head(xs, ws, bs), t)
                            for loss, t in zip(losses, teachers))
            total.backward()
        counts.append(mode.calls)
    assert counts == [chunks, 2 * chunks]   # forward, per chunk: once vs once per loss (the mode does not see the
    #                                         backward's recomputation, which repeats the forward's calls)


def test_losses_that_disagree_on_the_mask_are_refused():
    xs, ws, bs, xt, wt, labels = _sides(0)
    with pytest.raises(ValueError, match="shift and vocab_size"):
        chunked_token_losses((TokenCE(), TokenKL(shift=False)), labels, (None, None), 4, Head(xs, ws), (None, None))


def _spec():
    student = {"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 1,
               "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
               "tie_word_embeddings": True, "use_cache": False}
    teacher = {**student, "hidden_size": 48, "tie_word_embeddings": False}
    return {"name": "tiny_lm_fused",
            "input": {"named": {"input_ids": {"shape": [12], "dtype": "int64", "high": 96},
                                "attention_mask": {"shape": [12], "dtype": "int64"}}},
            "teacher": {"model": "hf:AutoModelForCausalLM", "kwargs": {"config": teacher}},
            "student": {"model": "hf:AutoModelForCausalLM", "kwargs": {"config": student}},
            "stages": [{"name": "main", "batch_size": 2, "optimizer": {"type": "adamw", "lr": 1.0e-3},
                        "losses": [{"name": "ce", "type": "token_ce", "weight": 0.5,
                                    "inputs": {"student": "student:lm_head"}},
                                   {"name": "kd", "type": "token_kl", "weight": 0.5, "args": {"temperature": 2.0},
                                    "inputs": {"student": "student:lm_head", "teacher": "teacher:lm_head"}}]}],
            "runtime": {"chunked_vocab": {"chunk_tokens": 7}},
            "data": {"dataset": "synthetic"}}


def test_the_pass_fuses_ce_and_kd_over_one_head_with_the_dense_loss_and_gradients():
    torch.manual_seed(0)
    d = kdgraph.compile(_spec())
    r = d.report.pass_result("chunked_vocab")
    assert r.details["chunked"] == ["ce", "kd"] and r.details["fused"] == [["ce", "kd"]], r.summary
    assert "ce + kd share one student head pass per chunk" in r.summary
    nodes = list(d.graph_module.graph.nodes)
    assert sum(n.target is chunked_token_losses for n in nodes) == 1
    assert not any(n.target is chunked_token_loss for n in nodes)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    out = d(batch)
    st = d.student
    params = [p for p in st.parameters() if p.requires_grad]
    kw = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        zt = d.teacher(**kw).logits
    zs = st(**kw).logits
    ce, kd = TokenCE()(zs, labels), TokenKL(temperature=2.0)(zs, zt, labels)
    torch.testing.assert_close(out.terms["ce"], 0.5 * ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.terms["kd"], 0.5 * kd, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(out.loss, params)
    want = torch.autograd.grad(0.5 * ce + 0.5 * kd, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the drawing: one box for the shared call, feeding each term's own box, which feed the total
    v = stage_view(d)
    assert v.nodes["loss:ce + kd"].lines == ["chunked_token_losses"]
    assert v.nodes["loss:kd"].lines == ["token_kl", "weight 0.5", "temperature=2.0"]
    edges = {(e.src, e.dst) for e in v.edges if e.src.startswith("loss:")}
    assert edges == {("loss:ce + kd", "loss:ce"), ("loss:ce + kd", "loss:kd"), ("loss:ce", "loss:total"),
                     ("loss:kd", "loss:total")}
