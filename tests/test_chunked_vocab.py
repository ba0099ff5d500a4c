"""The chunked vocabulary pass (runtime.chunked_vocab): the same loss and gradients as the dense logits, without them.

Reference: the token loss's own forward on dense logits (eager networks, or a plain F.linear), fp32; tolerance
rtol 1e-5 / atol 1e-6 on the loss, rtol 1e-4 / atol 1e-6 on gradients (the chunked sum adds in another order).
"""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import kdgraph
from kdgraph.cli.compile import compile_summary, print_compile
from kdgraph.compiler.nodeinfo import info_of, role_of
from kdgraph.compiler.chunked_loss import Dense, Head, chunked_token_loss, head_logits
from kdgraph.errors import SpecError
from kdgraph.methods.token_kl import TokenKL

TEACHER = {"model_type": "llama", "vocab_size": 136, "hidden_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64, "use_cache": False}
# Gemma2: tied embeddings (its default) and a final logit soft-cap read from the config; its special token ids set
# to the Llama teacher's (one tokenizer: the vocabulary check refuses configs that disagree on bos/eos)
STUDENT = {"model_type": "gemma2", "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 1,
           "bos_token_id": 1, "eos_token_id": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64,
           "max_position_embeddings": 64, "use_cache": False, "final_logit_softcapping": 5.0}
SEQ = 16


def _spec(chunk_tokens=5):
    return {"name": "tiny_lm_chunked",
            "input": {"named": {"input_ids": {"shape": [SEQ], "dtype": "int64", "high": 128},
                                "attention_mask": {"shape": [SEQ], "dtype": "int64"}}},
            "teacher": {"model": "hf:AutoModelForCausalLM", "kwargs": {"config": TEACHER}},
            "student": {"model": "hf:AutoModelForCausalLM", "kwargs": {"config": STUDENT}},
            "stages": [{"name": "main", "batch_size": 2, "optimizer": {"type": "adamw", "lr": 1.0e-3},
                        "losses": [{"name": "kd", "type": "token_kl", "weight": 1.0,
                                    "args": {"temperature": 2.0, "vocab_size": 128},
                                    "inputs": {"student": "student:@output", "teacher": "teacher:lm_head"}}]},
                       # lm_head before Gemma2's soft-cap: the cap's ops read it too, so the student side stays dense
                       {"name": "precap", "batch_size": 2, "optimizer": {"type": "adamw", "lr": 1.0e-3},
                        "losses": [{"name": "kd", "type": "token_kl", "args": {"vocab_size": 128},
                                    "inputs": {"student": "student:lm_head", "teacher": "teacher:lm_head"}}]}],
            "runtime": {"chunked_vocab": {"chunk_tokens": chunk_tokens}},
            "data": {"dataset": "synthetic"}}


def _batch(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (b, SEQ), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100          # a prompt
    labels[1, 11:] = -100         # padding
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.fixture(scope="module")
def distiller():
    torch.manual_seed(0)
    return kdgraph.compile(_spec(chunk_tokens=5))   # 2 x 15 shifted positions, 24 kept: 5 does not divide it


def test_chunked_graph_equals_dense_eager_loss_and_gradients(distiller):
    d = distiller
    st = d.student
    assert st.lm_head.weight is st.model.embed_tokens.weight          # tied
    batch = _batch()
    out = d(batch)
    assert out.logits is None                                           # the dense logits were never built
    names = [n for n, p in st.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, [st.get_parameter(n) for n in names])
    # dense reference: the eager networks' logits (softcap applied by Gemma2 itself) through the loss's forward
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        t_logits = d.teacher(**kw).logits
    ref = TokenKL(temperature=2.0, vocab_size=128)(st(**kw).logits, t_logits, batch["labels"])
    want = torch.autograd.grad(ref, [st.get_parameter(n) for n in names])
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    assert got[names.index("model.embed_tokens.weight")].abs().sum() > 0


def test_pass_report_graph_and_compile_output(distiller, capsys):
    d = distiller
    r = d.report.pass_result("chunked_vocab")
    assert r.changed and r.details["chunked"] == ["kd"] and r.details["logits_dropped"]
    assert {"student:lm_head", "teacher:lm_head", "student:/tanh"} <= set(r.details["removed"])
    nodes = list(d.graph_module.graph.nodes)
    assert not any(n.target is torch.ops.aten.linear.default and "lm_head" in str(n.args[1]) for n in nodes)
    # the student's soft-cap (div, tanh, mul after lm_head) went too
    assert not {f"{role_of(n)}:{info_of(n).name}" for n in nodes if info_of(n)} & set(r.details["removed"])
    assert sum(n.target is chunked_token_loss for n in nodes) == 1
    g = d.graph                                                          # the networkx view reads the new nodes
    assert [a["name"] for _, a in g.nodes(data=True) if a["role"] == "loss" and a["op"] == "call_function"
            and a["module_path"] == "losses.main.kd"] == ["kd"]
    print_compile(compile_summary(d))
    assert "chunked_vocab kd in chunks of 5 tokens" in " ".join(capsys.readouterr().out.split())


def test_a_head_output_other_nodes_read_stays_dense(distiller):
    d = distiller
    d.enter_stage("precap")
    try:
        r = d.report.pass_result("chunked_vocab")
        assert r.changed and r.details["chunked"] == ["kd"] and r.details["removed"] == ["teacher:lm_head"]
        assert r.details["dense"] == ["kd.student dense: also read by student:/div"]    # Gemma2's soft-cap
        batch = _batch(1)
        out = d(batch)
        assert out.logits is not None and out.logits.shape == (2, SEQ, 128)   # the student's capped logits
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        seen = []
        hook = d.student.lm_head.register_forward_hook(lambda _m, _i, o: seen.append(o))
        try:
            d.student(**kw)
        finally:
            hook.remove()
        with torch.no_grad():
            ref = TokenKL(vocab_size=128)(seen[0], d.teacher(**kw).logits, batch["labels"])
        torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    finally:
        d.enter_stage(0)


def _heads(seed, n_vocab=40, hidden=12, bias=True):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(3, 9, hidden, generator=g, requires_grad=True)
    ws = torch.randn(n_vocab, hidden, generator=g, requires_grad=True)
    bs = torch.randn(n_vocab, generator=g, requires_grad=True) if bias else None
    xt = torch.randn(3, 9, hidden, generator=g)
    wt = torch.randn(n_vocab + 8, hidden, generator=g)   # a padded teacher vocabulary
    labels = torch.randint(0, 32, (3, 9), generator=g)
    labels[0, :4] = -100
    labels[2, 6:] = -100
    return xs, ws, bs, xt, wt, labels


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
def test_chunked_loss_function_equals_dense_for_chunk_sizes(chunk):
    xs, ws, bs, xt, wt, labels = _heads(1)
    kl = TokenKL(temperature=1.5, vocab_size=32)
    n_tok = torch.tensor(40)                               # a step's token count (global normalisation)
    dense = kl(head_logits(xs, ws, bs, 0.5, 3.0), F.linear(xt, wt), labels, n_tok)
    chunked = chunked_token_loss(kl, labels, n_tok, chunk, Head(xs, ws, bs, 0.5, 3.0), Head(xt, wt))
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(chunked, (xs, ws, bs)), torch.autograd.grad(dense, (xs, ws, bs))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # a dense side (logits another node computes anyway, e.g. a cached teacher's) is indexed chunk by chunk
    dense_t = chunked_token_loss(kl, labels, n_tok, chunk, Head(xs, ws, bs, 0.5, 3.0), Dense(F.linear(xt, wt)))
    torch.testing.assert_close(dense_t, dense, rtol=1e-5, atol=1e-6)


def test_tied_weight_gets_embedding_and_head_gradients():
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(32, 8, generator=g, requires_grad=True)
    ids = torch.randint(0, 32, (2, 7), generator=g)
    labels = ids.clone()
    labels[1, :3] = -100
    wt = torch.randn(32, 8, generator=g)
    xt = torch.randn(2, 7, 8, generator=g)
    kl = TokenKL()
    x = torch.tanh(F.embedding(ids, emb))                 # the embedding and the head share one weight
    dense = kl(F.linear(x, emb), F.linear(xt, wt), labels)
    chunked = chunked_token_loss(kl, labels, None, 3, Head(x, emb), Head(xt, wt))
    (g_dense,) = torch.autograd.grad(dense, emb, retain_graph=True)
    (g_chunk,) = torch.autograd.grad(chunked, emb)
    torch.testing.assert_close(g_chunk, g_dense, rtol=1e-4, atol=1e-6)


def test_only_one_chunk_of_logits_is_saved_for_backward():
    xs, ws, bs, xt, wt, labels = _heads(3, n_vocab=400, hidden=16)
    kl = TokenKL(vocab_size=400)
    biggest = []

    def pack(t):
        biggest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_token_loss(kl, labels, None, 4, Head(xs, ws, bs), Head(xt, wt))
    loss.backward()
    kept = int((labels[:, 1:] != -100).sum())
    assert kept > 8 and max(biggest) <= 400 * 16            # the weights, never N x V logits
    biggest.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kl(F.linear(xs, ws, bs), F.linear(xt, wt), labels)
    assert max(biggest) >= kept * 400                       # the dense path saves its N x V softmax


def test_spec_refuses_chunked_vocab_with_fsdp_and_bad_chunk():
    spec = _spec()
    spec["runtime"] = {"chunked_vocab": {"chunk_tokens": 0}}
    with pytest.raises(SpecError, match="chunk_tokens"):
        kdgraph.load_spec(spec)
    spec["runtime"] = {"chunked_vocab": {"chunk_tokens": 64}, "distributed": "fsdp"}
    with pytest.raises(SpecError, match="chunked_vocab"):
        kdgraph.load_spec(spec)


class _TinyLM(torch.nn.Module):
    """A user's causal LM (not transformers'): a biased head, no config (no scale / soft-cap)."""

    def __init__(self, vocab: int = 48, width: int = 16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.lm_head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.mix(self.embed(input_ids))) * attention_mask.unsqueeze(-1)
        return self.lm_head(h)


def test_a_users_head_with_bias_is_chunked():
    kdgraph.register_model("chunked_vocab_tiny_lm")(_TinyLM)
    spec = _spec(chunk_tokens=3)
    spec["input"]["named"]["input_ids"]["high"] = 48
    spec["teacher"] = {"model": "registered:chunked_vocab_tiny_lm"}
    spec["student"] = {"model": "registered:chunked_vocab_tiny_lm", "kwargs": {"width": 8}}
    spec["stages"] = spec["stages"][:1]
    spec["stages"][0]["losses"][0] = {"name": "kd", "type": "token_kl", "args": {"temperature": 2.0}}  # @output
    torch.manual_seed(0)
    d = kdgraph.compile(spec)
    r = d.report.pass_result("chunked_vocab")
    assert sorted(r.details["removed"]) == ["student:lm_head", "teacher:lm_head"], r.summary
    assert d.student.lm_head.bias is not None
    batch = _batch(4)
    batch["input_ids"] = batch["input_ids"] % 48
    out = d(batch)
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ref = TokenKL(temperature=2.0)(d.student(**kw), d.teacher(**kw).detach(), batch["labels"])
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    params = list(d.student.parameters())
    for a, b in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def sparse_case():
    """Hidden states ``x`` (2 x 7 x 8) and a head ``w`` (20 words) that need gradients, labels with a prompt and
    padding at -100, and a top-5 teacher at T = 2 over the kept tokens (tests/test_chunked_fused.py reuses it)."""
    from kdgraph.methods.token_sparse import sparse_from_logits

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 8, generator=g, requires_grad=True)
    w = torch.randn(20, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 20, (2, 7), generator=g)
    labels[0, :2] = labels[1, 5:] = -100
    keep = labels[:, 1:] != -100
    return x, w, labels, sparse_from_logits(torch.randn(2, 7, 20, generator=g)[:, :-1][keep], 5, 2.0)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_token_ce_and_a_sparse_teacher_chunked_equal_their_dense_forward(chunk):
    """token_ce (the labels as the other side) and token_kl over a top-K cached teacher (issue 25 integration)."""
    from kdgraph.errors import KDGraphError
    from kdgraph.methods.token_ce import TokenCE

    x, w, labels, teacher = sparse_case()
    for loss, other, dense_other in ((TokenCE(), None, None), (TokenKL(temperature=2.0), Dense(teacher), teacher)):
        num = torch.tensor(6.5)
        got = chunked_token_loss(loss, labels, num, chunk, Head(x, w), other)
        logits = x @ w.T
        want = loss(logits, labels, num) if dense_other is None else loss(logits, dense_other, labels, num)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        for a, b in zip(torch.autograd.grad(got, (x, w)), torch.autograd.grad(want, (x, w))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    labels[1, 6] = 3  # one more kept token than the cached teacher holds
    with pytest.raises(KDGraphError, match=f"holds {len(teacher)} tokens but the labels keep {len(teacher) + 1}"):
        chunked_token_loss(TokenKL(temperature=2.0), labels, None, chunk, Head(x, w), Dense(teacher))
