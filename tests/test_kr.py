"""KR (knowledge review): parity of the ABF chain and the hierarchical context loss with torchdistill 1.1.5,
and the kr_resnet18 spec."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from torchdistill.core.forward_hook import ForwardHookManager
from torchdistill.losses.mid_level import HierarchicalContextLoss as TdHCL
from torchdistill.models.wrapper import AttentionBasedFusion as TdABF
from torchdistill.models.wrapper import Student4KnowledgeReview

from kdgraph.errors import ShapeError
from kdgraph.registry import ADAPTERS, LOSSES

REL = 1e-5
LEVELS = ["layer1", "layer2", "layer3", "layer4", "avgpool"]  # fine to coarse, as torchdistill lists them
CHANNELS = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512, "avgpool": 512}


def assert_rel(actual, expected, what, rel=REL):
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert scale > 0 and torch.isfinite(actual).all(), what
    assert err <= rel * scale, f"{what}: max abs error {err:.3e} > {rel:g} x {scale:.4e}"


def _tap(level: str) -> str:
    return level if level == "avgpool" else f"{level}.-1"


def _block_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The taps kdgraph's KR spec names: output of the last block of each stage, and avgpool."""
    feats: dict[str, torch.Tensor] = {}
    handles = [(getattr(model, lv)[-1] if lv != "avgpool" else model.avgpool).register_forward_hook(
        lambda m, i, o, lv=lv: feats.__setitem__(lv, o)) for lv in LEVELS]
    model(x)
    for h in handles:
        h.remove()
    return feats


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
def kr_run():
    """Run torchdistill's KR pipeline (hooks of its official config, Student4KnowledgeReview, five
    HierarchicalContextLosses) on a random ResNet-34 / ResNet-18 pair at 64 x 64."""
    torch.manual_seed(0)
    teacher = torchvision.models.resnet34().eval()
    student = torchvision.models.resnet18().eval()  # eval: the comparison below runs the student again
    abfs_cfg = [{"path": f"student_model.{lv}.-1.relu" if lv != "avgpool" else "student_model.avgpool",
                 "io": "input" if lv != "avgpool" else "output",
                 "kwargs": {"in_channels": CHANNELS[lv], "mid_channels": 512, "out_channels": CHANNELS[lv]}}
                for lv in LEVELS]
    x = torch.randn(2, 3, 64, 64)
    sizes = [1, 2, 4, 8, 16]  # torchdistill's [1, 7, 14, 28, 56] at 224, scaled to 64 x 64 input
    wrapper = Student4KnowledgeReview(student, abfs_cfg, device=torch.device("cpu"), device_ids=None,
                                      distributed=False, sizes=sizes)
    wrapper.abf_modules.train()

    t_mgr, s_mgr = ForwardHookManager("cpu"), ForwardHookManager("cpu")
    for lv in LEVELS[:-1]:
        t_mgr.add_hook(teacher, f"{lv}.-1.relu", requires_input=True, requires_output=False)
        s_mgr.add_hook(wrapper, f"student_model.{lv}.-1.relu", requires_input=True, requires_output=False)
    t_mgr.add_hook(teacher, "avgpool", requires_input=False, requires_output=True)
    s_mgr.add_hook(wrapper, "student_model.avgpool", requires_input=False, requires_output=True)
    for i in range(5):
        s_mgr.add_hook(wrapper, f"abf_modules.{i}", requires_input=False, requires_output=True)

    with torch.no_grad():
        teacher(x)
    wrapper(x)
    s_io = s_mgr.pop_io_dict()
    wrapper.secondary_forward(s_io)
    for k, v in s_mgr.pop_io_dict().items():
        if v:
            s_io[k] = v
    t_io = t_mgr.pop_io_dict()

    losses = {}
    for i, lv in enumerate(reversed(LEVELS)):  # abf_modules.0 is the avgpool level
        hcl = TdHCL(f"abf_modules.{i}", "output", f"{lv}.-1.relu" if lv != "avgpool" else "avgpool",
                    "input" if lv != "avgpool" else "output", reduction="mean", output_sizes=[4, 2, 1])
        losses[lv] = hcl(s_io, t_io)
    return {"teacher": teacher, "student": student, "wrapper": wrapper, "x": x, "s_io": s_io, "t_io": t_io,
            "losses": losses}


def test_abf_chain_and_hcl_match_torchdistill(kr_run):
    teacher, student, wrapper, x = kr_run["teacher"], kr_run["student"], kr_run["wrapper"], kr_run["x"]
    s_io = kr_run["s_io"]
    with torch.no_grad():
        t_feats = _block_outputs(teacher, x)
    s_feats = _block_outputs(student, x)

    # kdgraph's taps (block outputs) are the tensors torchdistill's relu-input hooks hold (the ReLU is in place)
    for lv in LEVELS[:-1]:
        assert torch.equal(s_feats[lv], s_io[f"student_model.{lv}.-1.relu"]["input"]), lv
        assert torch.equal(t_feats[lv], kr_run["t_io"][f"{lv}.-1.relu"]["input"]), lv

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
        assert_rel(term, kr_run["losses"][lv], f"HCL {lv}")
        total_actual = total_actual + term
    total_expected = sum(kr_run["losses"].values())
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
    grads_td = torch.autograd.grad(total_expected, [p for _, p, _ in pairs])
    grads_kg = torch.autograd.grad(total_actual, [p for _, _, p in pairs])
    for (name, _, _), g_kg, g_td in zip(pairs, grads_kg, grads_td):
        assert_rel(g_kg, g_td, f"gradient of {name}")


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
