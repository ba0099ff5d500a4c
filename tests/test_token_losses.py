"""The token losses against their oracles: TRL's generalized_jsd_loss (token_jsd, token_kl, token_rkl), the
DistiLLM authors' functions (token_skew_kl; fixture), closed forms (token_tvd, token_ce); padded vocabularies.

TRL oracle: trl 1.16.0's ``GKDTrainer.generalized_jsd_loss`` (trl/experimental/gkd/gkd_trainer.py), the installed
function's own source compiled alone (importing trl.experimental pulls in its trainers: ~20 s on 2 cores).
DistiLLM oracle: tests/fixtures/distillm_skew_kl.json, written once by running github.com/jongwooko/distillm
(commit d47e77ff9d27721783b32213be38c1204230cc0a) distillm/losses.py outside the project; the fixture records the
command (OMP_NUM_THREADS=1 python /tmp/distillm_oracle/make_fixture.py tests/fixtures/distillm_skew_kl.json).
"""
from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from kdgraph.methods.token_ce import TokenCE
from kdgraph.methods.token_jsd import TokenJSD
from kdgraph.methods.token_kl import TokenKL
from kdgraph.methods.token_rkl import TokenRKL
from kdgraph.methods.token_skew_kl import TokenSkewKL
from kdgraph.methods.token_tvd import TokenTVD

FIXTURE = Path(__file__).parent / "fixtures" / "distillm_skew_kl.json"


def _trl_generalized_jsd_loss():
    """TRL's installed ``GKDTrainer.generalized_jsd_loss``, its source compiled on its own."""
    spec = importlib.util.find_spec("trl")
    assert spec is not None, "trl (a test dependency) is not installed"
    path = Path(spec.origin).parent / "experimental" / "gkd" / "gkd_trainer.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GKDTrainer")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "generalized_jsd_loss")
    fn.decorator_list = []
    ns: dict = {"torch": torch, "F": F}
    exec(compile(ast.fix_missing_locations(ast.Module([fn], [])), str(path), "exec"), ns)  # noqa: S102
    return ns["generalized_jsd_loss"]


GJSD = _trl_generalized_jsd_loss()


def _batch(seed=0, b=3, t=9, v=40, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, t, v, generator=g) * 2).to(dtype).requires_grad_(True)
    te = (torch.randn(b, t, v, generator=g) * 2).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :4] = -100   # a prompt
    labels[2, 6:] = -100   # padding
    return s, te, labels


def _trl(s, t, labels, beta, T, num=None):
    """As TRL's compute_loss calls it: shifted logits and labels."""
    return GJSD(s[:, :-1], t[:, :-1], labels=labels[:, 1:], beta=beta, temperature=T, num_items_in_batch=num)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_token_jsd_matches_trl_values_and_gradients_fp32(beta):
    s, t, labels = _batch()
    ours = TokenJSD(beta=beta, temperature=2.0)(s, t, labels)
    ref = _trl(s, t, labels, beta, 2.0)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(ref, s)[0], rtol=1e-5, atol=1e-8)
    # TRL's global normaliser (num_items_in_batch) is kdgraph's num_tokens
    n = torch.tensor(37)
    torch.testing.assert_close(TokenJSD(beta=beta, temperature=2.0)(s, t, labels, n), _trl(s, t, labels, beta, 2.0, n),
                               rtol=1e-5, atol=1e-7)


def test_token_kl_and_rkl_are_trl_beta_0_and_1():
    s, t, labels = _batch(1)
    for cls, beta in ((TokenKL, 0.0), (TokenRKL, 1.0)):
        ours, ref = cls(temperature=1.5)(s, t, labels), _trl(s, t, labels, beta, 1.5)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(ref, s)[0], rtol=1e-5,
                                   atol=1e-8)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_token_jsd_bf16_inputs(beta):
    """bf16 logits: kdgraph computes in fp32 (the same values upcast: TRL's result at rtol 1e-5); against TRL run
    in bf16 arithmetic the difference is bf16's rounding, stated as rtol 2e-2."""
    s, t, labels = _batch(2, dtype=torch.bfloat16)
    ours = TokenJSD(beta=beta)(s, t, labels)
    assert ours.dtype == torch.float32
    s32 = s.detach().float().requires_grad_(True)
    ref32 = _trl(s32, t.float(), labels, beta, 1.0)
    torch.testing.assert_close(ours, ref32, rtol=1e-5, atol=1e-7)
    g_ours = torch.autograd.grad(ours, s)[0]
    assert g_ours.dtype == torch.bfloat16
    torch.testing.assert_close(g_ours, torch.autograd.grad(ref32, s32)[0].bfloat16(), rtol=1e-5, atol=1e-7)
    ref16 = _trl(s, t, labels, beta, 1.0)
    torch.testing.assert_close(ours, ref16.float(), rtol=2e-2, atol=1e-3)


def _fixture_cases():
    return json.loads(FIXTURE.read_text())["cases"]


_ORACLE = {"skewed_forward_kl": lambda lam: TokenSkewKL(alpha=lam, authors_value=True, shift=False),
           "skewed_reverse_kl": lambda lam: TokenSkewKL(alpha=lam, reverse=True, shift=False),
           # their forward_kl is the cross-entropy form too: token_kl's gradients, token_skew_kl(alpha 0)'s code value
           "forward_kl": lambda lam: TokenSkewKL(alpha=0.0, authors_value=True, shift=False),
           "reverse_kl": lambda lam: TokenRKL(shift=False),
           "tv_distance": lambda lam: TokenTVD(shift=False)}


@pytest.mark.parametrize("case", _fixture_cases(), ids=lambda c: f"{c['function']}-{c['lam']}-{c['dtype']}")
def test_against_distillm_authors_code(case):
    """fp32 and bf16 logits (both sides compute in fp32: values at rtol 1e-5); bf16 gradients are rounded to bf16
    at the end on both sides, so they may differ by one bf16 rounding step (2^-8 relative): rtol 8e-3."""
    dtype = getattr(torch, case["dtype"])
    s = torch.tensor(case["inputs"]["student"], dtype=dtype, requires_grad=True)
    t = torch.tensor(case["inputs"]["teacher"], dtype=dtype)
    labels = torch.tensor(case["inputs"]["labels"])
    loss = _ORACLE[case["function"]](case["lam"])(s, t, labels)
    torch.testing.assert_close(loss, torch.tensor(case["value"]), rtol=1e-5, atol=1e-6)
    grad = torch.autograd.grad(loss, s)[0]
    assert grad.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-5}
    torch.testing.assert_close(grad.float(), torch.tensor(case["grads"]["student"]), **tol)
    if case["function"] == "forward_kl":
        kl = TokenKL(shift=False)(s, t, labels)
        torch.testing.assert_close(torch.autograd.grad(kl, s)[0], torch.tensor(case["grads"]["student"]), rtol=1e-5,
                                   atol=1e-7)


def test_skew_kl_paper_value_adds_teacher_entropy_and_keeps_gradients():
    s, t, labels = _batch(3)
    paper, code = TokenSkewKL(alpha=0.1)(s, t, labels), TokenSkewKL(alpha=0.1, authors_value=True)(s, t, labels)
    keep = labels[:, 1:] != -100
    p_t = F.softmax(t[:, :-1][keep], -1)
    entropy = -(p_t * p_t.log()).sum(-1).mean()
    torch.testing.assert_close(code - paper, entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(paper, s)[0], torch.autograd.grad(code, s)[0], rtol=1e-5,
                               atol=1e-8)
    # alpha = 0: the plain forward / reverse KL
    torch.testing.assert_close(TokenSkewKL(alpha=0.0)(s, t, labels), TokenKL()(s, t, labels))
    torch.testing.assert_close(TokenSkewKL(alpha=0.0, reverse=True)(s, t, labels), TokenRKL()(s, t, labels))


def test_token_tvd_closed_form():
    """Two distributions with disjoint supports are 1 apart; equal ones 0; one hand-computed pair."""
    big = 1e4
    s = torch.full((1, 3, 4), -big)
    t = torch.full((1, 3, 4), -big)
    s[0, 0, 0] = t[0, 0, 1] = 0.0  # disjoint one-hot: TVD 1
    s[0, 1] = t[0, 1] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # equal: 0
    labels = torch.zeros(1, 3, dtype=torch.long)
    tvd = TokenTVD(shift=False)
    assert tvd.per_token(s[0], t[0])[:2].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    # p = (1/2, 1/2, 0, 0), q = (1/4, 1/4, 1/4, 1/4): TVD = 1/2 (|1/4| * 2 + |1/4| * 2) = 1/2
    s[0, 2] = torch.tensor([0.0, 0.0, -big, -big])
    t[0, 2] = torch.zeros(4)
    torch.testing.assert_close(tvd(s, t, labels), torch.tensor((1.0 + 0.0 + 0.5) / 3))


def test_token_ce_is_shifted_cross_entropy_and_a_task_term():
    s, _, labels = _batch(4, b=4, v=40)
    ours = TokenCE(temperature=1.0)(s, labels)
    ref = F.cross_entropy(s[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(ref, s)[0])
    assert TokenCE.task_term and not TokenKL.task_term
    s16 = s.detach().bfloat16().requires_grad_(True)  # bf16 logits: computed in fp32, the gradient back in bf16
    ce16 = TokenCE()(s16, labels)
    ref16 = F.cross_entropy(s16.float()[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ce16, ref16, rtol=1e-5, atol=1e-7)
    assert torch.autograd.grad(ce16, s16)[0].dtype == torch.bfloat16
    n = (labels[:, 1:] != -100).sum()
    halves = sum(TokenCE()(s[i:i + 2], labels[i:i + 2], n) for i in (0, 2))  # two micro-batches of 2 rows
    torch.testing.assert_close(halves, ours)


@pytest.mark.parametrize("cls", [TokenKL, TokenRKL, TokenJSD, TokenTVD, TokenSkewKL])
def test_padded_vocabulary_gives_the_unpadded_loss(cls):
    """A network whose embedding is padded (extra rows beyond the tokenizer's size) scores the same as the
    unpadded one once vocab_size slices it; the padded rows get no gradient."""
    s, t, labels = _batch(5, v=32)
    pad_s = torch.cat([s, torch.randn(3, 9, 8) * 5], -1)          # student padded to 40
    pad_t = torch.cat([t, torch.randn(3, 9, 24) * 5], -1)         # teacher padded to 56
    padded = cls(vocab_size=32)(pad_s, pad_t, labels)
    plain = cls()(s, t, labels)
    torch.testing.assert_close(padded, plain)
    g = torch.autograd.grad(padded, s)[0]
    torch.testing.assert_close(g, torch.autograd.grad(plain, s)[0])


def test_arguments_are_described_and_checked():
    """Every argument of every token loss has a description; out-of-range values are refused by the schema (a
    spec's args) or the constructor (Python)."""
    from pydantic import ValidationError

    for cls in (TokenCE, TokenKL, TokenRKL, TokenJSD, TokenTVD, TokenSkewKL):
        fields = cls.Args.model_fields
        assert {"temperature", "vocab_size", "shift"} <= set(fields)
        assert all(f.description for f in fields.values()), cls
        with pytest.raises(ValidationError):
            cls.Args(temperature=0)
    with pytest.raises(ValidationError):
        TokenJSD.Args(beta=1.5)
    with pytest.raises(ValidationError):
        TokenSkewKL.Args(alpha=-0.1)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\)"):
        TokenSkewKL(alpha=1.0)
    with pytest.raises(ValueError, match="authors_value concerns the skew forward KL only"):
        TokenSkewKL(reverse=True, authors_value=True)
