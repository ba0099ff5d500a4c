"""Numeric parity with torchdistill 1.1.5 of FSP, DAB, VID (+ its regressor), CCKD and KTAAD's three losses:
the same value and the same gradients (rel 1e-5) on identical inputs, modules initialised from the same weights.
torchdistill's losses read io dicts and sum their pairs; kdgraph has one term per pair, so a sum of kdgraph terms is
compared with one torchdistill call."""
from __future__ import annotations

import pytest
import torch

from torchdistill.losses.mid_level import AffinityLoss as TdAffinity
from torchdistill.losses.mid_level import AltActTransferLoss as TdDAB
from torchdistill.losses.mid_level import CCKDLoss as TdCCKD
from torchdistill.losses.mid_level import FSPLoss as TdFSP
from torchdistill.losses.mid_level import KTALoss as TdKTA
from torchdistill.losses.mid_level import RegularizationLoss as TdReg
from torchdistill.losses.mid_level import VIDLoss as TdVID
from torchdistill.models.wrapper import Regressor4VID

from kdgraph.errors import ShapeError
from kdgraph.methods.registry import ADAPTERS, LOSSES
from conftest import assert_rel


def _leaf(*shape, scale=1.0, relu=False):
    t = torch.randn(*shape) * scale
    return (t.relu() if relu else t).requires_grad_()


def _grads_match(expected, actual, tensors, what):
    g_e = torch.autograd.grad(expected, tensors, retain_graph=True)
    g_a = torch.autograd.grad(actual, tensors, retain_graph=True)
    for i, (a, e) in enumerate(zip(g_a, g_e)):
        assert_rel(a, e, f"{what}: gradient {i}")


def test_fsp_matches_torchdistill():
    """Two pairs as ResNet stages give them: (stage input 8x8, output 8x8) and (second block's input 4x4, stage
    output 4x4), plus a pair whose first map is larger (max-pooled to the smaller): one term per pair."""
    torch.manual_seed(0)
    B = 3
    s = {"a_in": _leaf(B, 8, 8, 8), "a": _leaf(B, 8, 8, 8), "b_in": _leaf(B, 16, 4, 4), "b": _leaf(B, 16, 4, 4),
         "c_in": _leaf(B, 8, 8, 8)}
    t = {k: torch.randn_like(v) for k, v in s.items()}
    pairs = {"p1": ("a_in", "a"), "p2": ("b_in", "b"), "p3": ("c_in", "b")}
    cfg = {n: {f"{side}_{which}": {"io": "output", "path": key} for side in ("student", "teacher")
               for which, key in zip(("first", "second"), keys)} | {"weight": w}
           for (n, keys), w in zip(pairs.items(), (1.0, 0.5, 2.0))}
    io = lambda d: {k: {"output": v} for k, v in d.items()}  # noqa: E731
    expected = TdFSP(cfg)(io(s), io(t))
    fsp = LOSSES.get("fsp")()
    actual = sum(w * fsp(s[f], s[g], t[f], t[g]) for (f, g), w in zip(pairs.values(), (1.0, 0.5, 2.0)))
    assert_rel(actual, expected, "FSP, three weighted pairs")
    _grads_match(expected, actual, list(s.values()), "FSP")


def test_fsp_shape_check_names_taps():
    taps = {"student_first": "student:layer1@input", "student_second": "student:layer1",
            "teacher_first": "teacher:layer1@input", "teacher_second": "teacher:layer1"}
    with pytest.raises(ShapeError, match="teacher:layer1@input"):
        LOSSES.get("fsp").check_shapes({"student_first": (2, 64, 8, 8), "student_second": (2, 64, 8, 8),
                                        "teacher_first": (2, 32, 8, 8), "teacher_second": (2, 64, 8, 8)}, taps,
                                       "stages[0].losses[0]")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dab_matches_torchdistill(reduction):
    """Connector outputs against post-ReLU teacher maps (zeros and positives, as ResNet stage outputs are)."""
    torch.manual_seed(1)
    s = [_leaf(3, 8, 6, 6, scale=2.0), _leaf(3, 16, 3, 3, scale=2.0)]
    t = [torch.randn(3, 8, 6, 6).relu(), torch.randn(3, 16, 3, 3).relu()]
    cfg = {f"p{i}": {"student": {"io": "output", "path": f"c{i}"}, "teacher": {"io": "output", "path": f"l{i}"},
                     "weight": 1} for i in range(2)}
    expected = TdDAB(cfg, margin=1.0, reduction=reduction)(
        {f"c{i}": {"output": v} for i, v in enumerate(s)}, {f"l{i}": {"output": v} for i, v in enumerate(t)})
    dab = LOSSES.get("dab")(margin=1.0, reduction=reduction)
    actual = dab(s[0], t[0]) + dab(s[1], t[1])
    assert_rel(actual, expected, f"DAB ({reduction})")
    _grads_match(expected, actual, s, f"DAB ({reduction})")


def test_vid_regressor_and_loss_match_torchdistill():
    """Regressor4VID and kdgraph's vid_regressor from the same weights: same mean and variance; VIDLoss equal in
    value and in the gradients of every regressor parameter (soft_plus_param included) and of the student map."""
    torch.manual_seed(2)
    cls = ADAPTERS.get("vid_regressor")
    args = cls.infer_args({"eps": 1e-5, "init_pred_var": 5.0}, {"x": (2, 8, 6, 6)}, (2, 12, 6, 6))
    ours = cls(**args)
    td = Regressor4VID(in_channels=8, middle_channels=12, out_channels=12, eps=1e-5, init_pred_var=5.0)
    assert_rel(ours.soft_plus_param, td.soft_plus_param.float(), "initial softplus parameter")
    td.soft_plus_param.data.normal_()  # a trained-looking variance, the same on both sides
    ours.load_state_dict({k: v.float() for k, v in td.state_dict().items()}, strict=True)
    td.float()
    x = torch.randn(3, 8, 6, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    teacher = torch.randn(3, 12, 6, 6).relu()
    mean_td, var_td = td(xa)
    mean, var = ours(xb)
    assert_rel(mean, mean_td, "VID mean"), assert_rel(var, var_td, "VID variance")
    cfg = {"p": {"student": {"io": "output", "path": "r"}, "teacher": {"io": "output", "path": "l"}, "weight": 1}}
    expected = TdVID(cfg)({"r": {"output": (mean_td, var_td)}}, {"l": {"output": teacher}})
    actual = LOSSES.get("vid")()(mean, var, teacher)
    assert_rel(actual, expected, "VID loss")
    expected.backward(), actual.backward()
    assert_rel(xb.grad, xa.grad, "VID: gradient of the student map")
    td_params = dict(td.named_parameters())
    for name, p in ours.named_parameters():
        assert_rel(p.grad, td_params[name].grad, f"VID: gradient of {name}")


@pytest.mark.parametrize("kernel", ["gaussian", "bilinear"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_cckd_matches_torchdistill(kernel, reduction):
    """128-d (student) and 96-d (teacher) embeddings of 6 samples; torchdistill's kernel_config uses 'type'."""
    torch.manual_seed(3)
    s, t = _leaf(6, 128, scale=0.1), _leaf(6, 96, scale=0.1)
    kernel_config = {"type": kernel, "gamma": 0.4, "max_p": 2}
    expected = TdCCKD("linear", "linear", kernel_config, reduction)({"linear": {"output": s}},
                                                                    {"linear": {"output": t}})
    actual = LOSSES.get("cckd")(kernel=kernel, gamma=0.4, max_p=2, reduction=reduction)(s, t)
    assert_rel(actual, expected, f"CCKD ({kernel}, {reduction})")
    _grads_match(expected, actual, [s, t], f"CCKD ({kernel}, {reduction})")


@pytest.mark.parametrize("p,reduction", [(1, "mean"), (2, "mean"), (2, "sum")])
def test_kta_matches_torchdistill(p, reduction):
    torch.manual_seed(4)
    s, t = _leaf(3, 10, 8, 8), _leaf(3, 10, 8, 8)
    expected = TdKTA(p=p, q=2, reduction=reduction, knowledge_translator_path="e", feature_adapter_path="a")(
        {"a": {"output": s}}, {"e": {"output": t}})
    actual = LOSSES.get("kta")(p=p, q=2, reduction=reduction)(s, t)
    assert_rel(actual, expected, f"KTA (p={p}, {reduction})")
    _grads_match(expected, actual, [s, t], f"KTA (p={p})")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_affinity_matches_torchdistill(reduction):
    """The closed form |s|^4 + |e|^4 - 2 (s.e)^2 gives torchdistill's per-channel HW x HW matrices' norm."""
    torch.manual_seed(5)
    s, t = _leaf(3, 10, 8, 8), _leaf(3, 10, 8, 8)
    expected = TdAffinity("a", "e", reduction=reduction)({"a": {"output": s}}, {"e": {"output": t}})
    aff = LOSSES.get("affinity")(reduction=reduction)
    actual = aff(s, t)
    assert_rel(actual, expected, f"affinity ({reduction})")
    _grads_match(expected, actual, [s, t], f"affinity ({reduction})")
    # identical maps: zero loss and a finite (zero) gradient, as torchdistill's
    same = s.detach().clone().requires_grad_()
    zero = aff(same, same.detach())
    (g,) = torch.autograd.grad(zero, same)
    assert zero.item() == 0.0 and torch.isfinite(g).all()


@pytest.mark.parametrize("p", [1, 2])
def test_regularization_matches_torchdistill(p):
    torch.manual_seed(6)
    z = _leaf(3, 10, 4, 4)
    expected = TdReg("e", io_type="output", is_from_teacher=True, p=p)({}, {"e": {"output": z}})
    actual = LOSSES.get("regularization")(p=p)(z)
    assert_rel(actual, expected, f"regularization (p={p})")
    _grads_match(expected, actual, [z], f"regularization (p={p})")
