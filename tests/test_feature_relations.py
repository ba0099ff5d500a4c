"""SRD, ICKD, PKT, RKD and SPKD: parity with torchdistill 1.1.5 (values and gradients, adapters on copied
weights: SRDModelWrapper's linear + BatchNorm1d, Student4ICKD's ChannelSimilarityEmbed), and their ImageNet specs
compiled at 64 x 64 and trained."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torchdistill.losses.mid_level import ChSimLoss as TdChSim
from torchdistill.losses.mid_level import PKTLoss as TdPKT
from torchdistill.losses.mid_level import RKDLoss as TdRKD
from torchdistill.losses.mid_level import SPKDLoss as TdSPKD
from torchdistill.losses.mid_level import SRDLoss as TdSRD
from torchdistill.models.wrapper import SRDModelWrapper, Student4ICKD

import kdgraph
from kdgraph.errors import ShapeError
from kdgraph.methods.registry import ADAPTERS, LOSSES
from conftest import assert_rel, sgd_steps_change_only_trained, small_spec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def feats():
    """Student / teacher maps of different widths (as ResNet-18 / a wider teacher), and logits."""
    g = torch.Generator().manual_seed(0)
    return {"s": torch.randn(8, 64, 4, 4, generator=g), "t": torch.randn(8, 128, 4, 4, generator=g).relu(),
            "z_s": 3 * torch.randn(8, 100, generator=g), "z_t": 3 * torch.randn(8, 100, generator=g)}


def _grads_match(actual, expected, a_params, e_params, what):
    assert_rel(actual, expected, f"{what}: value")
    g_a = torch.autograd.grad(actual, a_params)
    g_e = torch.autograd.grad(expected, e_params)
    for i, (a, e) in enumerate(zip(g_a, g_e)):
        assert_rel(a, e, f"{what}: gradient {i}")


# ------------------------------------------------------------------------------------------------
# Pairwise relations: PKT, RKD, SPKD (student gradients; the teacher's maps carry none)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,ours,td", [
    ("pkt", dict(eps=1e-7), lambda: TdPKT("s", "output", "t", "output", eps=1e-7)),
    ("rkd", dict(dist_factor=1.0, angle_factor=2.0), lambda: TdRKD("s", "t", 1.0, 2.0, "mean")),
    ("rkd", dict(dist_factor=0.0, angle_factor=1.0, reduction="sum"), lambda: TdRKD("s", "t", 0.0, 1.0, "sum")),
    ("spkd", dict(reduction="batchmean", normalization="torchdistill"), lambda: TdSPKD("s", "t", "batchmean")),
    ("spkd", dict(reduction="sum", normalization="torchdistill"), lambda: TdSPKD("s", "t", "sum")),
])
def test_pairwise_relations_match_torchdistill(feats, name, ours, td):
    f_s, f_t = feats["s"], feats["t"]
    if name == "pkt":  # torchdistill's PKT reads 2-D fc inputs; kdgraph flattens the avgpool output itself
        f_s, f_t = f_s.mean((2, 3)), f_t.mean((2, 3))
    s_a, s_e = f_s.clone().requires_grad_(True), f_s.clone().requires_grad_(True)
    actual = LOSSES.get(name)(**ours)(s_a[:, :, None, None] if name == "pkt" else s_a, f_t)
    expected = td()({"s": {"output": s_e}}, {"t": {"output": f_t}})
    _grads_match(actual, expected, [s_a], [s_e], f"{name} {ours}")
    assert actual.item() > 0
    if name != "rkd":  # identical relations give (about) zero
        assert LOSSES.get(name)(**ours)(f_t, f_t).abs().item() < 1e-6


def test_spkd_paper_normalization_is_l2(feats):
    """The paper's rows are L2-normalised (torchdistill's normalize(G, 1) takes L1 norms): checked by hand."""
    f_s, f_t = feats["s"], feats["t"]

    def g(z):
        z = z.flatten(1) @ z.flatten(1).t()
        return z / z.pow(2).sum(1, keepdim=True).sqrt()

    expected = (g(f_t) - g(f_s)).pow(2).sum() / 64
    assert_rel(LOSSES.get("spkd")()(f_s, f_t), expected, "SPKD (paper, L2 rows)")
    td = TdSPKD("s", "t", "batchmean")({"s": {"output": f_s}}, {"t": {"output": f_t}})
    assert abs(LOSSES.get("spkd")()(f_s, f_t).item() - td.item()) > 1e-3 * td.item()


def test_pairwise_relations_reject_different_batches():
    for name in ("pkt", "rkd", "spkd"):
        with pytest.raises(ShapeError, match="batch size"):
            LOSSES.get(name).check_shapes({"student": (4, 512), "teacher": (8, 512)},
                                          {"student": "student:avgpool", "teacher": "teacher:avgpool"}, "losses[1]")


# ------------------------------------------------------------------------------------------------
# SRD: srd_projector (linear + BatchNorm on batch statistics) and the loss
# ------------------------------------------------------------------------------------------------


def test_srd_projector_and_loss_match_torchdistill(feats):
    """torchdistill's SRDModelWrapper (student: linear 64 -> 128 + BatchNorm1d(affine False, eps 1e-4); teacher:
    BatchNorm1d only, both in training mode) and kdgraph's srd_projector with the same linear weights: same
    projections, same SRDLoss value, same gradients for the linear layer, the student map and the logits."""
    norm = {"num_features": 128, "eps": 1e-4, "affine": False}
    td_s = SRDModelWrapper({"path": "f", "io": "output"}, norm, CPU, None, False,
                           linear_kwargs={"in_features": 64, "out_features": 128}, student_model=nn.Identity())
    td_t = SRDModelWrapper({"path": "f", "io": "output"}, norm, CPU, None, False, teacher_model=nn.Identity())
    cls = ADAPTERS.get("srd_projector")
    ours_s = cls(**cls.infer_args({"linear": True, "out_features": 128}, {"x": tuple(feats["s"].shape)}, None))
    ours_t = cls(**cls.infer_args({"linear": False}, {"x": tuple(feats["t"].shape)}, None))
    assert ours_t.linear is None and not list(ours_t.parameters()) and not list(ours_t.buffers())
    assert ours_s.linear.bias is None  # by default: the normalisation cancels a bias
    ours_s.linear.weight.data.copy_(td_s.linear.weight.data)

    def td_projection(wrapper, f):
        out = {}
        h = wrapper.norm_layer.register_forward_hook(lambda _m, _i, o: out.__setitem__("p", o))
        wrapper.secondary_forward({"f": {"output": f}})
        h.remove()
        return out["p"]

    f_s_a, f_s_e = feats["s"].clone().requires_grad_(True), feats["s"].clone().requires_grad_(True)
    z_a, z_e = feats["z_s"].clone().requires_grad_(True), feats["z_s"].clone().requires_grad_(True)
    p_s, p_t = ours_s(f_s_a), ours_t(feats["t"])
    e_s, e_t = td_projection(td_s, f_s_e), td_projection(td_t, feats["t"])
    assert_rel(p_s, e_s, "srd_projector (student, linear)")
    assert_rel(p_t, e_t, "srd_projector (teacher, no linear)")
    td_loss = TdSRD("norm_layer", "output", "norm_layer", "output", ".", "output", ".", "output",
                    exponent=4.0, temperature=1.0, reduction="batchmean")
    expected = td_loss({"norm_layer": {"output": e_s}, ".": {"output": z_e}},
                       {"norm_layer": {"output": e_t}, ".": {"output": feats["z_t"]}})
    actual = LOSSES.get("srd")(exponent=4.0, temperature=1.0)(p_s, p_t, z_a, feats["z_t"])
    # torchdistill's bias gets no gradient (the batch normalisation subtracts it again): round-off only
    (g_bias,) = torch.autograd.grad(expected, td_s.linear.bias, retain_graph=True)
    assert g_bias.abs().max().item() < 1e-6
    _grads_match(actual, expected, [ours_s.linear.weight, f_s_a, z_a], [td_s.linear.weight, f_s_e, z_e], "SRD")


# ------------------------------------------------------------------------------------------------
# ICKD: ickd_embed (ChannelSimilarityEmbed) and the channel-similarity loss
# ------------------------------------------------------------------------------------------------


def test_ickd_embed_and_loss_match_torchdistill(feats):
    td_wrap = Student4ICKD(nn.Identity(), {"embed1": {"path": "f", "io": "output", "in_channels": 64,
                                                      "out_channels": 128}}, CPU, None, False).train()
    cls = ADAPTERS.get("ickd_embed")
    ours = cls(**cls.infer_args({}, {"x": tuple(feats["s"].shape)}, tuple(feats["t"].shape))).train()
    assert (ours.conv2d.in_channels, ours.conv2d.out_channels) == (64, 128)
    td_embed = td_wrap.embed_dict["embed1"]
    ours.load_state_dict(td_embed.state_dict())
    out = {}
    h = td_embed.register_forward_hook(lambda _m, _i, o: out.__setitem__("e", o))
    td_wrap.secondary_forward({"f": {"output": feats["s"]}})
    h.remove()
    e_ours = ours(feats["s"])
    assert_rel(e_ours, out["e"], "ickd_embed output")
    td_loss = TdChSim({"pair1": {"teacher": {"io": "output", "path": "t"},
                                 "student": {"io": "output", "path": "embed_dict.embed1"}, "weight": 1}})
    expected = td_loss({"embed_dict.embed1": {"output": out["e"]}}, {"t": {"output": feats["t"]}})
    actual = LOSSES.get("ickd")()(e_ours, feats["t"])
    _grads_match(actual, expected, list(ours.parameters()), list(td_embed.parameters()), "ICKD")
    with pytest.raises(ShapeError, match="match"):
        cls.infer_args({}, {"x": (2, 64, 4, 4)}, None)


# ------------------------------------------------------------------------------------------------
# The ImageNet specs, compiled at 64 x 64 and trained
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["srd_resnet18.yaml", "ickd_resnet18.yaml", "pkt_resnet18.yaml",
                                  "rkd_resnet18.yaml", "spkd_resnet18.yaml"])
def test_feature_relation_specs_train(spec):
    """Each spec compiles offline at 64 x 64; its compiled terms equal the eager loss modules fed the networks'
    tapped values (through the distiller's own adapters); one SGD step on a batch of 2 moves every parameter of what
    the stage trains (student and trained adapters) and leaves the teacher and frozen adapters bit-identical."""
    d = kdgraph.compile(small_spec(spec)).train()
    stage = d.spec.stage(d.stage)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([3, 999])
    out = d(x, y)
    values: dict[str, torch.Tensor] = {}
    hooks = [getattr(net, layer).register_forward_hook(lambda _m, _i, o, k=f"{role}:{layer}": values.__setitem__(k, o))
             for role, net in (("student", d.student), ("teacher", d.teacher)) for layer in ("layer4", "avgpool")]
    with torch.no_grad():
        values["teacher:@output"] = d.teacher(x)
    values["student:@output"] = d.student(x)
    for h in hooks:
        h.remove()

    def tap(ref: str) -> torch.Tensor:
        if ref.startswith("adapter:"):
            a = d.spec.adapters[ref[len("adapter:"):]]
            return d.adapters[ref[len("adapter:"):]](**{k: tap(v) for k, v in a.inputs.items()})
        return values[ref]

    for ls in stage.losses:
        module = LOSSES.get(ls.type)(**ls.args)
        if ls.type == "cross_entropy":
            expected = module(values["student:@output"], y)
        else:
            bound = {**module.default_inputs, **ls.inputs}
            expected = module(**{k: tap(bound[k]) for k in module.inputs if k in bound})  # optional inputs unbound
        assert_rel(out.terms[ls.name], ls.weight * expected, f"{spec}: term {ls.name}")
    sgd_steps_change_only_trained(d, x, y, steps=1)
