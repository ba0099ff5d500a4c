"""KD w/ LS, DIST+ and SKD: parity with torchdistill 1.1.5 (values and gradients), SKD's ``code`` mode against
values the authors' code produced (tests/fixtures/skd_authors_code.json), and their ImageNet specs trained."""
from __future__ import annotations

import json

import pytest
import torch

from torchdistill.losses.mid_level import DISTPlusLoss as TdDISTPlus
from torchdistill.losses.mid_level import LogitStdKDLoss as TdLogitStdKD
from torchdistill.losses.mid_level import SKDDirectionLoss as TdSKDDirection
from torchdistill.losses.mid_level import SKDInstanceLoss as TdSKDInstance

import kdgraph
from kdgraph.methods.registry import LOSSES
from conftest import ROOT, assert_rel, sgd_steps_change_only_trained, small_spec


@pytest.fixture(scope="module")
def logits():
    g = torch.Generator().manual_seed(0)
    return 3 * torch.randn(8, 100, generator=g), 3 * torch.randn(8, 100, generator=g)


@pytest.fixture(scope="module")
def maps():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 32, 4, 4, generator=g), torch.randn(8, 32, 4, 4, generator=g)


def _io(z):
    return {".": {"output": z}}


def _parity(actual_fn, expected_fn, *inputs, what: str):
    """Same value and the same gradient wrt every input within 1e-5 relative."""
    a_in = [x.detach().clone().requires_grad_(True) for x in inputs]
    e_in = [x.detach().clone().requires_grad_(True) for x in inputs]
    actual, expected = actual_fn(*a_in), expected_fn(*e_in)
    assert_rel(actual, expected, f"{what}: value")
    for i, (g_a, g_e) in enumerate(zip(torch.autograd.grad(actual, a_in), torch.autograd.grad(expected, e_in))):
        assert_rel(g_a, g_e, f"{what}: gradient wrt input {i}")
    return actual.item()


# ------------------------------------------------------------------------------------------------
# KD w/ LS
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_kd_logit_std_matches_torchdistill(logits, temperature):
    """torchdistill's 0.5 * CE + 9 * T^2 * KL(standardised) is kdgraph's 0.5 cross_entropy + 9 kd_logit_std."""
    z_s, z_t = logits
    y = torch.arange(8) * 7
    td = TdLogitStdKD(".", "output", ".", "output", temperature=temperature, alpha=0.5, beta=9)
    ce, ls = LOSSES.get("cross_entropy")(), LOSSES.get("kd_logit_std")(temperature=temperature)
    _parity(lambda s, t: 0.5 * ce(s, y) + 9 * ls(s, t), lambda s, t: td(_io(s), _io(t), y), z_s, z_t,
            what=f"KD w/ LS (T={temperature})")
    # standardisation: the loss ignores each row's shift and scale; plain KD does not
    kd = LOSSES.get("kd")(temperature=temperature)
    assert ls(5 * z_s + 3, z_t).item() == pytest.approx(ls(z_s, z_t).item(), rel=1e-5)
    assert kd(5 * z_s + 3, z_t).item() != pytest.approx(kd(z_s, z_t).item(), rel=1e-2)


# ------------------------------------------------------------------------------------------------
# DIST+
# ------------------------------------------------------------------------------------------------

DP = dict(beta=2.0, gamma=2.0, iota=1.0, kappa=1.0, tau=1.0)


def test_dist_plus_torchdistill_mode_matches_torchdistill(logits, maps):
    td = TdDISTPlus(".", "output", ".", "output", "f", "output", "f", "output", **DP)
    ours = LOSSES.get("dist_plus")(channel_relation="torchdistill", **DP)
    _parity(lambda s, t, fs, ft: ours(s, t, fs, ft),
            lambda s, t, fs, ft: td({".": {"output": s}, "f": {"output": fs}}, {".": {"output": t}, "f": {"output": ft}}),
            *logits, *maps, what="DIST+ (channel_relation: torchdistill)")


def test_dist_plus_paper_mode_is_one_minus_torchdistills_channel_term(logits, maps):
    """paper = torchdistill - iota * rho + iota * (1 - rho), rho = torchdistill's own channel_relation; and the
    paper mode is minimal where torchdistill's is not: identical features give channel term 0 (torchdistill: +1),
    opposite ones 2 (torchdistill: -1, its minimum)."""
    td = TdDISTPlus(".", "output", ".", "output", "f", "output", "f", "output", **DP)
    paper = LOSSES.get("dist_plus")(**DP)
    tdmode = LOSSES.get("dist_plus")(channel_relation="torchdistill", **DP)
    z_s, z_t = logits
    f_s, f_t = maps

    def expected(s, t, fs, ft):
        rho = td.channel_relation(fs, ft)
        return td({".": {"output": s}, "f": {"output": fs}}, {".": {"output": t}, "f": {"output": ft}}) \
            - DP["iota"] * rho + DP["iota"] * (1 - rho)

    _parity(paper, expected, z_s, z_t, f_s, f_t, what="DIST+ (channel_relation: paper)")
    only_channel = dict(beta=0.0, gamma=0.0, iota=1.0, kappa=0.0)
    p, c = LOSSES.get("dist_plus")(**only_channel), LOSSES.get("dist_plus")(channel_relation="torchdistill", **only_channel)
    assert p(z_s, z_t, f_t, f_t).item() == pytest.approx(0.0, abs=1e-6)
    assert p(z_s, z_t, -f_t, f_t).item() == pytest.approx(2.0, abs=1e-6)
    assert c(z_s, z_t, f_t, f_t).item() == pytest.approx(1.0, abs=1e-6)
    assert c(z_s, z_t, -f_t, f_t).item() == pytest.approx(-1.0, abs=1e-6)
    assert tdmode(z_s, z_t, f_s, f_t).item() != pytest.approx(paper(z_s, z_t, f_s, f_t).item(), abs=1e-3)


# ------------------------------------------------------------------------------------------------
# SKD
# ------------------------------------------------------------------------------------------------


def test_skd_paper_mode_matches_torchdistill(logits):
    td_i = TdSKDInstance(".", "output", ".", "output", temperature=4.0, mode="paper")
    td_d = TdSKDDirection(".", "output", ".", "output", tikhonov=0.1, mode="paper")
    ours_i = LOSSES.get("skd_instance")(temperature=4.0)
    ours_d = LOSSES.get("skd_direction")(tikhonov=0.1)
    _parity(ours_i, lambda s, t: td_i(_io(s), _io(t)), *logits, what="SKD instance (paper)")
    _parity(ours_d, lambda s, t: td_d(_io(s), _io(t)), *logits, what="SKD direction (paper)")


def test_skd_direction_code_mode_matches_torchdistill(logits):
    td_d = TdSKDDirection(".", "output", ".", "output", tikhonov=0.1, mode="code")
    ours_d = LOSSES.get("skd_direction")(tikhonov=0.1, mode="code")
    _parity(ours_d, lambda s, t: td_d(_io(s), _io(t)), *logits, what="SKD direction (code)")


def test_skd_code_mode_matches_the_authors_code():
    """Values and gradients the authors' SKD.forward_train produced once (their repository, commit and command are
    in the fixture): the batch-mean KL times the masked fraction, not torchdistill's per-sample masking."""
    fix = json.loads((ROOT / "tests" / "fixtures" / "skd_authors_code.json").read_text())
    assert "StreamLined" in fix["source"] and "745862882aaba69c9403a8fa562decaafbe03d35" in fix["source"]
    z_s = torch.tensor(fix["student_logits"], dtype=torch.float64, requires_grad=True)
    z_t = torch.tensor(fix["teacher_logits"], dtype=torch.float64)
    inst = LOSSES.get("skd_instance")(temperature=fix["temperature"], mode="code")(z_s, z_t)
    direc = LOSSES.get("skd_direction")(tikhonov=fix["tikhonov"], mode="code")(z_s, z_t)
    assert_rel(inst, torch.tensor(fix["loss_kd"], dtype=torch.float64), "SKD instance (code) vs the authors")
    assert_rel(direc, torch.tensor(fix["loss_bc"], dtype=torch.float64), "SKD direction (code) vs the authors")
    (g_i,) = torch.autograd.grad(inst, z_s)
    (g_d,) = torch.autograd.grad(direc, z_s)
    assert_rel(g_i, torch.tensor(fix["grad_kd_wrt_student"], dtype=torch.float64), "SKD instance gradient")
    assert_rel(g_d, torch.tensor(fix["grad_bc_wrt_student"], dtype=torch.float64), "SKD direction gradient")
    # torchdistill's code mode masks per sample: a different number on the same logits
    td_code = TdSKDInstance(".", "output", ".", "output", temperature=fix["temperature"], mode="code")
    assert abs(td_code(_io(z_s.detach()), _io(z_t)).item() - fix["loss_kd"]) > 1e-3 * fix["loss_kd"]


# ------------------------------------------------------------------------------------------------
# The ImageNet specs, compiled at 64 x 64 and trained
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,terms", [
    ("kd_logit_std_resnet18.yaml", {"ce": "cross_entropy", "kd_ls": "kd_logit_std"}),
    ("dist_plus_resnet18.yaml", {"ce": "cross_entropy", "dist_plus": "dist_plus"}),
    ("skd_resnet18.yaml", {"instance": "skd_instance", "direction": "skd_direction"}),
])
def test_logit_relation_specs_train(spec, terms):
    """Each spec compiles offline at 64 x 64 with its terms (no adapter), one SGD step on a batch of 2 moves every
    student parameter and leaves the teacher bit-identical, and the compiled terms equal the eager loss modules
    on the same networks' outputs."""
    d = kdgraph.compile(small_spec(spec)).train()
    assert len(d.adapters) == 0
    stage = d.spec.stage(d.stage)
    assert {ls.name: ls.type for ls in stage.losses} == terms
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([3, 999])
    out = d(x, y)
    with torch.no_grad():
        feats: dict = {}
        hooks = [m.register_forward_hook(lambda _m, _i, o, k=k: feats.__setitem__(k, o))
                 for k, m in (("t", d.teacher.layer4), ("s", d.student.layer4))]
        z_t, z_s = d.teacher(x), d.student(x)
        for h in hooks:
            h.remove()
    for ls in stage.losses:
        module = LOSSES.get(ls.type)(**ls.args)
        extra = (feats["s"], feats["t"]) if ls.type == "dist_plus" else ()
        expected = ls.weight * (module(z_s, y) if ls.type == "cross_entropy" else module(z_s, z_t, *extra))
        assert_rel(out.terms[ls.name], expected, f"{spec}: term {ls.name}")
    sgd_steps_change_only_trained(d, x, y, steps=1)
