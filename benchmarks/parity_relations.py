"""Max relative error of value and gradients against torchdistill 1.1.5 for KD w/ LS, DIST+, SKD, SRD, ICKD, PKT,
RKD and SPKD (the figures of docs/relation_methods.md; the tests in tests/test_logit_relations.py and
tests/test_feature_relations.py assert the same comparisons at 1e-5).

    python benchmarks/parity_relations.py

Relative error: max |kdgraph - torchdistill| / max |torchdistill| over the value or over every gradient tensor.
"""
from __future__ import annotations

import torch
from torch import nn
from torchdistill.losses import mid_level as td
from torchdistill.models.wrapper import SRDModelWrapper, Student4ICKD

from kdgraph.methods.registry import ADAPTERS, LOSSES

CPU = torch.device("cpu")


def rel(a: torch.Tensor, e: torch.Tensor) -> float:
    return ((a.detach().double() - e.detach().double()).abs().max() / e.detach().double().abs().max()).item()


def compare(ours, theirs, inputs, ours_params=(), theirs_params=()):
    """(value error, gradient error) of ours(*inputs) vs theirs(*inputs); gradients wrt inputs[0] and params."""
    a_in = [x.clone().requires_grad_(i == 0) for i, x in enumerate(inputs)]
    e_in = [x.clone().requires_grad_(i == 0) for i, x in enumerate(inputs)]
    a, e = ours(*a_in), theirs(*e_in)
    g_a = torch.autograd.grad(a, [a_in[0], *ours_params])
    g_e = torch.autograd.grad(e, [e_in[0], *theirs_params])
    return rel(a, e), max(rel(x, y) for x, y in zip(g_a, g_e))


def io(z, key="."):
    return {key: {"output": z}}


def main() -> None:
    g = torch.Generator().manual_seed(0)
    z_s, z_t = 3 * torch.randn(8, 100, generator=g), 3 * torch.randn(8, 100, generator=g)
    f_s, f_t = torch.randn(8, 64, 4, 4, generator=g), torch.randn(8, 128, 4, 4, generator=g).relu()
    m_s, m_t = torch.randn(8, 32, 4, 4, generator=g), torch.randn(8, 32, 4, 4, generator=g)
    y = torch.arange(8) * 7
    rows = {}
    ce, ls = LOSSES.get("cross_entropy")(), LOSSES.get("kd_logit_std")(temperature=2.0)
    t_ls = td.LogitStdKDLoss(".", "output", ".", "output", temperature=2.0, alpha=0.5, beta=9)
    rows["kd_logit_std (0.5 CE + 9 KD-LS, T 2)"] = compare(lambda s, t: 0.5 * ce(s, y) + 9 * ls(s, t),
                                                           lambda s, t: t_ls(io(s), io(t), y), [z_s, z_t])
    dp = dict(beta=2.0, gamma=2.0, iota=1.0, kappa=1.0, tau=1.0)
    t_dp = td.DISTPlusLoss(".", "output", ".", "output", "f", "output", "f", "output", **dp)
    o_dp = LOSSES.get("dist_plus")(channel_relation="torchdistill", **dp)
    rows["dist_plus (channel_relation: torchdistill)"] = compare(
        lambda fs, s, t, ft: o_dp(s, t, fs, ft),
        lambda fs, s, t, ft: t_dp({".": {"output": s}, "f": {"output": fs}}, {".": {"output": t}, "f": {"output": ft}}),
        [m_s, z_s, z_t, m_t])
    for mode in ("paper", "code"):
        if mode == "paper":
            t_i = td.SKDInstanceLoss(".", "output", ".", "output", temperature=4.0, mode="paper")
            rows["skd_instance (paper)"] = compare(LOSSES.get("skd_instance")(temperature=4.0),
                                                   lambda s, t: t_i(io(s), io(t)), [z_s, z_t])
        t_d = td.SKDDirectionLoss(".", "output", ".", "output", tikhonov=0.1, mode=mode)
        rows[f"skd_direction ({mode})"] = compare(LOSSES.get("skd_direction")(tikhonov=0.1, mode=mode),
                                                  lambda s, t: t_d(io(s), io(t)), [z_s, z_t])
    rows["pkt"] = compare(LOSSES.get("pkt")(), lambda s, t: td.PKTLoss("s", "output", "t", "output")(
        io(s.flatten(1), "s"), io(t.flatten(1), "t")), [f_s.mean((2, 3), keepdim=True), f_t.mean((2, 3), keepdim=True)])
    rows["rkd (dist 1, angle 2)"] = compare(LOSSES.get("rkd")(), lambda s, t: td.RKDLoss("s", "t", 1.0, 2.0, "mean")(
        io(s, "s"), io(t, "t")), [f_s, f_t])
    rows["spkd (normalization: torchdistill)"] = compare(
        LOSSES.get("spkd")(normalization="torchdistill"),
        lambda s, t: td.SPKDLoss("s", "t", "batchmean")(io(s, "s"), io(t, "t")), [f_s, f_t])

    # SRD: projector on the same linear weights + loss
    norm = {"num_features": 128, "eps": 1e-4, "affine": False}
    w_s = SRDModelWrapper({"path": "f", "io": "output"}, norm, CPU, None, False,
                          linear_kwargs={"in_features": 64, "out_features": 128}, student_model=nn.Identity())
    w_t = SRDModelWrapper({"path": "f", "io": "output"}, norm, CPU, None, False, teacher_model=nn.Identity())
    p_s = ADAPTERS.get("srd_projector")(64, 128, linear=True)
    p_t = ADAPTERS.get("srd_projector")(128, linear=False)
    p_s.linear.weight.data.copy_(w_s.linear.weight.data)
    t_srd = td.SRDLoss("n", "output", "n", "output", ".", "output", ".", "output", exponent=4.0, temperature=1.0)

    def hooked(module, run):
        out = {}
        h = module.register_forward_hook(lambda _m, _i, o: out.__setitem__("o", o))
        run()
        h.remove()
        return out["o"]

    def td_srd(fs, s, t, ft):
        e_s = hooked(w_s.norm_layer, lambda: w_s.secondary_forward(io(fs, "f")))
        e_t = hooked(w_t.norm_layer, lambda: w_t.secondary_forward(io(ft, "f")))
        return t_srd({"n": {"output": e_s}, ".": {"output": s}}, {"n": {"output": e_t}, ".": {"output": t}})

    rows["srd + srd_projector (linear weight)"] = compare(lambda fs, s, t, ft: LOSSES.get("srd")()(p_s(fs), p_t(ft), s, t),
                                                          td_srd, [f_s, z_s, z_t, f_t], [p_s.linear.weight],
                                                          [w_s.linear.weight])
    # ICKD: embed on the same weights + loss
    w_i = Student4ICKD(nn.Identity(), {"e": {"path": "f", "io": "output", "in_channels": 64, "out_channels": 128}},
                       CPU, None, False)
    emb = ADAPTERS.get("ickd_embed")(64, 128)
    emb.load_state_dict(w_i.embed_dict["e"].state_dict())
    t_cs = td.ChSimLoss({"p": {"teacher": {"io": "output", "path": "t"}, "student": {"io": "output", "path": "e"}}})
    rows["ickd + ickd_embed (conv, BN weights)"] = compare(
        lambda fs, ft: LOSSES.get("ickd")()(emb(fs), ft),
        lambda fs, ft: t_cs(io(hooked(w_i.embed_dict["e"], lambda: w_i.secondary_forward(io(fs, "f"))), "e"), io(ft, "t")),
        [f_s, f_t], list(emb.parameters()), list(w_i.embed_dict["e"].parameters()))
    print("| method | value rel. error | gradients max rel. error |\n|---|---|---|")
    for name, (v, gr) in rows.items():
        print(f"| {name} | {v:.1e} | {gr:.1e} |")


if __name__ == "__main__":
    main()
