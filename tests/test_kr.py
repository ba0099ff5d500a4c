"""KR (knowledge review): parity of the ABF chain and the hierarchical context loss with torchdistill 1.1.5,
and the kr_resnet18 spec."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torchdistill.core.forward_hook import ForwardHookManager
from torchdistill.losses.mid_level import HierarchicalContextLoss as TdHCL
from torchdistill.models.wrapper import AttentionBasedFusion as TdABF
from torchdistill.models.wrapper import Student4KnowledgeReview

import kdgraph
from kdgraph.errors import ShapeError
from kdgraph.methods.registry import ADAPTERS, LOSSES
from conftest import assert_rel, sgd_steps_change_only_trained, small_spec

LEVELS = ["layer1", "layer2", "layer3", "layer4", "avgpool"]  # fine to coarse, as torchdistill lists them
CHANNELS = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512, "avgpool": 512}


def _kdgraph_abfs(shapes: dict[str, tuple], teacher_shapes: dict[str, tuple]) -> dict[str, nn.Module]:
    """kdgraph abf adapters built from tap shapes via infer_args, chained coarse to fine."""
    cls = ADAPTERS.get("abf")
    abfs = {}
    previous = None
    for lv in reversed(LEVELS):
        input_shapes = {"x": shapes[lv]}
        if previous is not None:
            n, _, h, w = shapes[previous] if len(shapes[previous]) == 4 else (*shapes[previous], 1, 1)
            input_shapes["residual"] = (n, 512, h, w)
        args = cls.infer_args({"mid_channels": 512}, input_shapes, teacher_shapes[lv])
        abfs[lv] = cls(**args)
        previous = lv
    return abfs


def _copy_abf(src: TdABF, dst: nn.Module) -> None:
    """torchdistill ABF -> kdgraph abf: conv1 -> reduce, conv2 -> project, attention_conv -> attention."""
    rename = {"conv1.": "reduce.", "conv2.": "project.", "attention_conv.": "attention."}
    state = {}
    for k, v in src.state_dict().items():
        for old, new in rename.items():
            if k.startswith(old):
                state[new + k[len(old):]] = v
    dst.load_state_dict(state, strict=True)


@pytest.fixture(scope="module")
def kr():
    """The compiled kr_resnet18 spec (64 x 64) and torchdistill's KR pipeline on the same networks: the hooks of
    its official config, Student4KnowledgeReview around the same student, five HierarchicalContextLosses. The
    torchdistill ABF weights are copied into the distiller's abf adapters, so both sides compute the same thing."""
    torch.manual_seed(0)
    d = kdgraph.compile(small_spec("kr_resnet18.yaml")).train()
    abfs_cfg = [{"path": f"student_model.{lv}.-1.relu" if lv != "avgpool" else "student_model.avgpool",
                 "io": "input" if lv != "avgpool" else "output",
                 "kwargs": {"in_channels": CHANNELS[lv], "mid_channels": 512, "out_channels": CHANNELS[lv]}}
                for lv in LEVELS]
    sizes = [1, 2, 4, 8, 16]  # torchdistill's [1, 7, 14, 28, 56] at 224, for a 64 x 64 input
    wrapper = Student4KnowledgeReview(d.student, abfs_cfg, device=torch.device("cpu"), device_ids=None,
                                      distributed=False, sizes=sizes)
    wrapper.train()
    for lv, td_abf in zip(reversed(LEVELS), wrapper.abf_modules):  # abf_modules[0] is the avgpool level
        _copy_abf(td_abf, d.adapters[f"abf_{lv}"])
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])

    out = d(x, y)  # kdgraph first: torchdistill's hooks go on the same modules below

    t_mgr, s_mgr = ForwardHookManager("cpu"), ForwardHookManager("cpu")
    for lv in LEVELS[:-1]:
        t_mgr.add_hook(d.teacher, f"{lv}.-1.relu", requires_input=True, requires_output=False)
        s_mgr.add_hook(wrapper, f"student_model.{lv}.-1.relu", requires_input=True, requires_output=False)
    t_mgr.add_hook(d.teacher, "avgpool", requires_input=False, requires_output=True)
    s_mgr.add_hook(wrapper, "student_model.avgpool", requires_input=False, requires_output=True)
    for i in range(5):
        s_mgr.add_hook(wrapper, f"abf_modules.{i}", requires_input=False, requires_output=True)
    try:
        with torch.no_grad():
            d.teacher(x)
        logits = wrapper(x)
        s_io = s_mgr.pop_io_dict()
        wrapper.secondary_forward(s_io)
        for k, v in s_mgr.pop_io_dict().items():
            if v:
                s_io[k] = v
        t_io = t_mgr.pop_io_dict()
    finally:
        t_mgr.clear(), s_mgr.clear()

    losses = {}
    for i, lv in enumerate(reversed(LEVELS)):
        hcl = TdHCL(f"abf_modules.{i}", "output", f"{lv}.-1.relu" if lv != "avgpool" else "avgpool",
                    "input" if lv != "avgpool" else "output", reduction="mean", output_sizes=[4, 2, 1])
        losses[lv] = hcl(s_io, t_io)
    return {"d": d, "wrapper": wrapper, "s_io": s_io, "t_io": t_io, "losses": losses, "out": out,
            "ce": nn.functional.cross_entropy(logits, y)}


def _td_feature(io: dict, lv: str, student: bool) -> torch.Tensor:
    prefix = "student_model." if student else ""
    return io[f"{prefix}avgpool"]["output"] if lv == "avgpool" else io[f"{prefix}{lv}.-1.relu"]["input"]


def test_abf_chain_and_hcl_match_torchdistill(kr):
    """kdgraph abf adapters (built by infer_args from tap shapes) and hcl, fed torchdistill's hooked features:
    same ABF outputs, same fused maps, same five HCL values and the same gradient for every ABF parameter."""
    s_io, t_io, wrapper = kr["s_io"], kr["t_io"], kr["wrapper"]
    s_feats = {lv: _td_feature(s_io, lv, True).detach() for lv in LEVELS}
    t_feats = {lv: _td_feature(t_io, lv, False) for lv in LEVELS}
    abfs = _kdgraph_abfs({lv: tuple(f.shape) for lv, f in s_feats.items()},
                         {lv: tuple(f.shape) for lv, f in t_feats.items()})
    assert abfs["avgpool"].attention is None and all(abfs[lv].attention is not None for lv in LEVELS[:-1])
    td_by_level = dict(zip(reversed(LEVELS), wrapper.abf_modules))
    for lv in LEVELS:
        _copy_abf(td_by_level[lv], abfs[lv])
        abfs[lv].train()

    hcl = LOSSES.get("hcl")()
    residual = None
    total_actual = 0.0
    for i, lv in enumerate(reversed(LEVELS)):
        out, residual = abfs[lv](s_feats[lv], residual) if residual is not None else abfs[lv](s_feats[lv])
        td_out, td_res = s_io[f"abf_modules.{i}"]["output"]
        assert_rel(out, td_out, f"ABF {lv}: output")
        assert_rel(residual, td_res, f"ABF {lv}: fused map passed on")
        term = hcl(out, t_feats[lv])
        assert_rel(term, kr["losses"][lv], f"HCL {lv}")
        total_actual = total_actual + term
    total_expected = sum(kr["losses"].values())
    assert_rel(total_actual, total_expected, "sum of the five HCL terms")

    # gradients: every ABF parameter of kdgraph gets the gradient of its torchdistill twin
    rename = {"conv1.": "reduce.", "conv2.": "project.", "attention_conv.": "attention."}
    pairs = []
    for lv in LEVELS:
        kg_params = dict(abfs[lv].named_parameters())
        for name, p_td in td_by_level[lv].named_parameters():
            prefix = next(o for o in rename if name.startswith(o))
            pairs.append((f"{lv}.{name}", p_td, kg_params.pop(rename[prefix] + name[len(prefix):])))
        assert not kg_params, f"kdgraph abf {lv} has parameters torchdistill's lacks: {sorted(kg_params)}"
    grads_td = torch.autograd.grad(total_expected, [p for _, p, _ in pairs], retain_graph=True)
    grads_kg = torch.autograd.grad(total_actual, [p for _, _, p in pairs])
    for (name, _, _), g_kg, g_td in zip(pairs, grads_kg, grads_td):
        assert_rel(g_kg, g_td, f"gradient of {name}")


def test_kr_spec_matches_torchdistill_end_to_end(kr):
    """The compiled spec's terms equal torchdistill's pipeline on the same networks and ABF weights; the taps
    student/teacher:layerN.-1 are the tensors torchdistill's layerN.-1.relu input hooks hold."""
    d, out = kr["d"], kr["out"]
    assert [type(a).__name__ for a in d.adapters.values()] == ["AttentionBasedFusion"] * 5
    assert d.adapters["abf_avgpool"].attention is None and d.adapters["abf_layer1"].attention is not None
    assert set(out.terms) == {"ce", *(f"hcl_{lv}" for lv in LEVELS)}
    assert_rel(out.terms["ce"], kr["ce"], "CE term")
    for lv in LEVELS:
        assert_rel(out.terms[f"hcl_{lv}"], kr["losses"][lv], f"compiled hcl_{lv} term")
    assert_rel(out.loss, kr["ce"] + sum(kr["losses"].values()), "compiled KR total loss")


def test_hcl_weights_halve_per_used_pooled_size():
    """k < h: a 2 x 2 map uses only k = 1, with weight 1/2 (not 1/8); a 7 x 7 map uses 4, 2, 1."""
    torch.manual_seed(1)
    mse = nn.functional.mse_loss
    pool = nn.functional.adaptive_avg_pool2d
    hcl = LOSSES.get("hcl")()
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    assert_rel(hcl(s, t), (mse(s, t) + 0.5 * mse(pool(s, 1), pool(t, 1))) / 1.5, "hcl on 2 x 2")
    s, t = torch.randn(2, 3, 7, 7), torch.randn(2, 3, 7, 7)
    expected = (mse(s, t) + 0.5 * mse(pool(s, 4), pool(t, 4)) + 0.25 * mse(pool(s, 2), pool(t, 2))
                + 0.125 * mse(pool(s, 1), pool(t, 1))) / 1.875
    assert_rel(hcl(s, t), expected, "hcl on 7 x 7")
    s, t = torch.randn(2, 3, 1, 1), torch.randn(2, 3, 1, 1)
    assert_rel(hcl(s, t), mse(s, t), "hcl on 1 x 1 (avgpool level) is a plain MSE")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("sizes", [((3, 5), (6, 10)), ((4, 4), (7, 7)), ((1, 1), (4, 4)), ((5, 5), (5, 5))],
                         ids=["x2", "4to7", "1to4", "same"])
def test_nearest_upsample_equals_interpolate(sizes, channels_last):
    """The expanded-view upsampling gives F.interpolate's values exactly, and its gradient up to summation order."""
    from kdgraph.methods.kr import nearest_upsample
    torch.manual_seed(4)
    small, big = sizes
    x = torch.randn(2, 6, *small)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = nearest_upsample(a, big), nn.functional.interpolate(b, size=big, mode="nearest")
    assert ya.shape == yb.shape and torch.equal(ya, yb)
    g = torch.randn_like(yb)
    ya.backward(g), yb.backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shapes", [((7, 7), (4, 4)), ((8, 8), (4, 4)), ((4, 4), (1, 1))], ids=["4to7", "4to8", "1to4"])
def test_abf_fusion_equals_torchdistills_concatenation(shapes):
    """kdgraph's ABF splits the attention convolution instead of concatenating [x, up(r)]; outputs and gradients
    equal torchdistill's ABF (the authors' formulation) at integer and non-integer upsampling factors."""
    torch.manual_seed(5)
    (h, w), (rh, rw) = shapes
    td = TdABF(in_channels=16, mid_channels=32, out_channels=24, uses_attention=True).train()
    ours = ADAPTERS.get("abf")(in_channels=16, out_channels=24, mid_channels=32, uses_attention=True).train()
    _copy_abf(td, ours)
    x, r = torch.randn(3, 16, h, w), torch.randn(3, 32, rh, rw)
    xa, ra, xb, rb = (t.clone().requires_grad_() for t in (x, r, x, r))
    out_td, fused_td = td(xa, ra, size=h)
    out, fused = ours(xb, rb)
    assert_rel(out, out_td, "abf output"), assert_rel(fused, fused_td, "abf fused map")
    (out_td.square().sum() + fused_td.sum()).backward()
    (out.square().sum() + fused.sum()).backward()
    for what, a, b in [("grad x", xb.grad, xa.grad), ("grad residual", rb.grad, ra.grad),
                       ("grad attention", ours.attention[0].weight.grad, td.attention_conv[0].weight.grad),
                       ("grad reduce", ours.reduce[0].weight.grad, td.conv1[0].weight.grad)]:
        assert_rel(a, b, what)


def test_abf_reads_a_flat_embedding_as_1x1_map():
    torch.manual_seed(2)
    cls = ADAPTERS.get("abf")
    args = cls.infer_args({}, {"x": (2, 512)}, (2, 512, 1, 1))
    assert args["vector_input"] is True and args["uses_attention"] is False and args["mid_channels"] == 512
    flat = cls(**args).eval()
    image = cls(**{**args, "vector_input": False}).eval()
    image.load_state_dict(flat.state_dict())
    x = torch.randn(2, 512)
    out_flat, res_flat = flat(x)
    out_img, _ = image(x[:, :, None, None])
    assert out_flat.shape == (2, 512, 1, 1) and res_flat.shape == (2, 512, 1, 1)
    assert torch.equal(out_flat, out_img)


def test_abf_and_hcl_shape_errors():
    cls = ADAPTERS.get("abf")
    with pytest.raises(ShapeError, match="mid_channels"):
        cls.infer_args({"mid_channels": 256}, {"x": (2, 64, 16, 16), "residual": (2, 512, 8, 8)}, (2, 64, 16, 16))
    with pytest.raises(ShapeError, match="coarse to fine"):
        cls.infer_args({}, {"x": (2, 512, 2, 2), "residual": (2, 512, 8, 8)}, (2, 512, 2, 2))
    with pytest.raises(ShapeError, match="match"):
        cls.infer_args({}, {"x": (2, 64, 16, 16)}, None)
    with pytest.raises(ShapeError) as e:
        LOSSES.get("hcl").check_shapes({"student": (2, 64, 16, 16), "teacher": (2, 128, 8, 8)},
                                       {"student": "adapter:abf_layer1.0", "teacher": "teacher:layer2.-1"}, "losses[1]")
    assert "adapter:abf_layer1.0" in str(e.value) and "teacher:layer2.-1" in str(e.value)


# ------------------------------------------------------------------------------------------------
# The spec, compiled
# ------------------------------------------------------------------------------------------------


def test_kr_spec_trains_student_and_all_five_abfs(kr):
    d = kr["d"].train()
    assert d.stages == ["main"] and d.batch_inputs == []
    torch.manual_seed(6)
    terms = sgd_steps_change_only_trained(d, torch.randn(2, 3, 64, 64), torch.tensor([3, 4]))
    assert set(terms) == {"ce", *(f"hcl_{lv}" for lv in LEVELS)} and all(len(v) == 2 for v in terms.values())
