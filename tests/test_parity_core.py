"""Numeric parity with torchdistill 1.1.5 (the oracle) for KD, AT, L2 and FT, and the Tf-KD spec.

Every comparison feeds the same tensors (feature maps and logits of random-init torchvision
ResNet-34 / ResNet-18 at 64 x 64, collected with torchdistill's own ForwardHookManager at the
module paths of its official ImageNet configs) to torchdistill's loss and to kdgraph's loss terms,
and asks for the same value within 1e-5 relative, and for FT's modules the same outputs on copied
weights. Gradients are compared too where a term trains something.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from torchdistill.core.forward_hook import ForwardHookManager
from torchdistill.losses.mid_level import ATLoss as TdATLoss
from torchdistill.losses.mid_level import FTLoss as TdFTLoss
from torchdistill.losses.mid_level import KDLoss as TdKDLoss
from torchdistill.losses.mid_level import SimpleLossWrapper
from torchdistill.models.wrapper import Paraphraser4FactorTransfer, Translator4FactorTransfer

import kdgraph
from kdgraph.errors import ModelError
from kdgraph.methods.registry import ADAPTERS, LOSSES
from conftest import assert_rel, small_spec



def _io(mgr: ForwardHookManager) -> dict:
    return mgr.pop_io_dict()


@pytest.fixture(scope="module")
def io_dicts():
    """torchdistill io dicts of a random ResNet-34 teacher and ResNet-18 student on one 64x64 batch."""
    torch.manual_seed(0)
    teacher = torchvision.models.resnet34().eval()
    student = torchvision.models.resnet18().eval()
    paths = ["layer3", "layer4", "avgpool", "fc"]
    t_mgr, s_mgr = ForwardHookManager("cpu"), ForwardHookManager("cpu")
    for p in paths:
        t_mgr.add_hook(teacher, p, requires_input=False, requires_output=True)
        s_mgr.add_hook(student, p, requires_input=False, requires_output=True)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        teacher(x)
    student(x)  # the student keeps its graph: gradients are compared below
    targets = torch.tensor([3, 141, 592, 653])
    return {"teacher": _io(t_mgr), "student": _io(s_mgr), "targets": targets}


# ------------------------------------------------------------------------------------------------
# KD
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_matches_torchdistill_kdloss(io_dicts, temperature):
    s_io, t_io, y = io_dicts["student"], io_dicts["teacher"], io_dicts["targets"]
    z_s = s_io["fc"]["output"].detach().clone().requires_grad_(True)
    z_t = t_io["fc"]["output"]

    td = TdKDLoss("fc", "output", "fc", "output", temperature=temperature, alpha=0.5)
    expected = td({"fc": {"output": z_s}}, {"fc": {"output": z_t}}, y)
    (g_expected,) = torch.autograd.grad(expected, z_s)

    ce = LOSSES.get("cross_entropy")()
    kd = LOSSES.get("kd")(temperature=temperature)
    actual = 0.5 * ce(z_s, y) + 0.5 * kd(z_s, z_t)
    (g_actual,) = torch.autograd.grad(actual, z_s)

    assert_rel(actual, expected, f"KD total (alpha 0.5, T={temperature})")
    assert_rel(g_actual, g_expected, f"KD gradient wrt student logits (T={temperature})")
    # the two terms really differ from each other (T matters): the soft term is not a copy of CE
    assert not torch.isclose(kd(z_s, z_t), ce(z_s, y))


def test_kd_alpha_09_is_tfkd_weighting(io_dicts):
    """Tf-KD's alpha = 0.9 is the spec's CE weight 0.9 + kd weight 0.1."""
    s_io, t_io, y = io_dicts["student"], io_dicts["teacher"], io_dicts["targets"]
    z_s, z_t = s_io["fc"]["output"].detach(), t_io["fc"]["output"]
    expected = TdKDLoss("fc", "output", "fc", "output", temperature=1.0, alpha=0.9)(
        {"fc": {"output": z_s}}, {"fc": {"output": z_t}}, y)
    actual = 0.9 * LOSSES.get("cross_entropy")()(z_s, y) + 0.1 * LOSSES.get("kd")(temperature=1.0)(z_s, z_t)
    assert_rel(actual, expected, "Tf-KD total (alpha 0.9, T=1)")


# ------------------------------------------------------------------------------------------------
# AT
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_at_matches_torchdistill_atloss(io_dicts, mode):
    s_io, t_io = io_dicts["student"], io_dicts["teacher"]
    pairs = {f"pair_{p}": {"teacher": {"io": "output", "path": p}, "student": {"io": "output", "path": p},
                           "weight": 1} for p in ("layer3", "layer4")}
    expected = 1000.0 * TdATLoss(pairs, mode=mode)(s_io, t_io)

    at = LOSSES.get("at")(mode=mode)
    terms = [1000.0 * at(s_io[p]["output"], t_io[p]["output"]) for p in ("layer3", "layer4")]
    actual = terms[0] + terms[1]
    assert_rel(actual, expected, f"AT ({mode}) weighted sum over layer3 + layer4")
    assert all(t.item() > 0 for t in terms)

    # gradients reach the student maps identically
    g_expected = torch.autograd.grad(expected, [s_io["layer3"]["output"]], retain_graph=True)[0]
    g_actual = torch.autograd.grad(actual, [s_io["layer3"]["output"]], retain_graph=True)[0]
    assert_rel(g_actual, g_expected, f"AT ({mode}) gradient wrt student layer3")


# ------------------------------------------------------------------------------------------------
# L2
# ------------------------------------------------------------------------------------------------


def test_l2_matches_torchdistill_mse_wrapper(io_dicts):
    s_io, t_io = io_dicts["student"], io_dicts["teacher"]
    td = SimpleLossWrapper(nn.MSELoss(reduction="mean"),
                           input={"is_from_teacher": False, "module_path": "avgpool", "io": "output"},
                           target={"is_from_teacher": True, "module_path": "avgpool", "io": "output"})
    expected = 15.0 * td(s_io, t_io, io_dicts["targets"])
    actual = 15.0 * LOSSES.get("mse")()(s_io["avgpool"]["output"], t_io["avgpool"]["output"])
    assert_rel(actual, expected, "L2: 15 * MSE(avgpool)")


# ------------------------------------------------------------------------------------------------
# FT: paraphraser, translator and loss
# ------------------------------------------------------------------------------------------------


def _copy_sequential(src: nn.Sequential, dst: nn.Module) -> None:
    """Copy weights by position: torchdistill's i-th conv/BN -> kdgraph's i-th conv/BN (same kinds)."""
    src_mods = [m for m in src if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d))]
    dst_mods = [m for m in dst.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d))]
    assert [type(m) for m in src_mods] == [type(m) for m in dst_mods], "layer kinds differ"
    for a, b in zip(src_mods, dst_mods):
        b.load_state_dict(a.state_dict(), strict=True)


@pytest.mark.parametrize("uses_bn", [False, True])
def test_ft_paraphraser_matches_torchdistill(io_dicts, uses_bn):
    torch.manual_seed(1)
    f_t = io_dicts["teacher"]["layer4"]["output"]  # 4 x 512 x 2 x 2
    c = f_t.shape[1]
    td = Paraphraser4FactorTransfer(k=0.5, num_input_channels=c, uses_bn=uses_bn)
    enc_args = ADAPTERS.get("ft_encoder").infer_args({"rate": 0.5, "uses_bn": uses_bn}, {"x": tuple(f_t.shape)}, None)
    enc = ADAPTERS.get("ft_encoder")(**enc_args)
    factor_shape = (f_t.shape[0], enc.out_channels, *f_t.shape[2:])
    dec_args = ADAPTERS.get("ft_decoder").infer_args({"uses_bn": uses_bn}, {"x": factor_shape}, tuple(f_t.shape))
    dec = ADAPTERS.get("ft_decoder")(**dec_args)
    _copy_sequential(td.encoder, enc)
    _copy_sequential(td.decoder, dec)
    td.train(), enc.train(), dec.train()

    expected_factor = td.encoder(f_t)
    expected_recon = td(f_t)  # uses_decoder=True: decoder(encoder(F))
    factor = enc(f_t)
    recon = dec(factor)
    assert factor.shape == (4, 256, 2, 2)
    assert_rel(factor, expected_factor, f"paraphraser encoder output (bn={uses_bn})")
    assert_rel(recon, expected_recon, f"paraphraser reconstruction (bn={uses_bn})")

    # stage-1 loss: torchdistill trains the paraphraser with MSE(paraphraser(F_t), F_t)
    td_rec = SimpleLossWrapper(nn.MSELoss(), input={"is_from_teacher": True, "module_path": "paraphraser", "io": "output"},
                               target={"is_from_teacher": True, "module_path": "layer4", "io": "output"})
    expected_loss = td_rec({}, {"paraphraser": {"output": expected_recon}, "layer4": {"output": f_t}}, None)
    actual_loss = LOSSES.get("mse")()(recon, f_t)
    assert_rel(actual_loss, expected_loss, f"paraphraser reconstruction MSE (bn={uses_bn})")
    g_expected = torch.autograd.grad(expected_loss, td.encoder[0].weight)[0]
    g_actual = torch.autograd.grad(actual_loss, enc[0].weight)[0]
    assert_rel(g_actual, g_expected, "gradient of the reconstruction MSE wrt the first encoder conv")


@pytest.mark.parametrize("uses_bn", [False, True])
def test_ft_translator_and_ft_loss_match_torchdistill(io_dicts, uses_bn):
    torch.manual_seed(2)
    f_s = io_dicts["student"]["layer4"]["output"].detach()
    f_t = io_dicts["teacher"]["layer4"]["output"]
    paraphraser = Paraphraser4FactorTransfer(k=0.5, num_input_channels=512, uses_bn=uses_bn, uses_decoder=False)
    td_translator = Translator4FactorTransfer(512, 256, uses_bn=uses_bn)
    with torch.no_grad():
        teacher_factor = paraphraser(f_t)

    args = ADAPTERS.get("ft_translator").infer_args({"uses_bn": uses_bn}, {"x": tuple(f_s.shape)},
                                                     tuple(teacher_factor.shape))
    translator = ADAPTERS.get("ft_translator")(**args)
    _copy_sequential(td_translator, translator)
    expected_g, actual_g = td_translator(f_s), translator(f_s)
    assert_rel(actual_g, expected_g, f"translator output (bn={uses_bn})")

    for p in (1, 2):
        td_loss = TdFTLoss(p=p, reduction="mean")
        expected = 1000.0 * td_loss({"translator": {"output": expected_g}}, {"paraphraser": {"output": teacher_factor}})
        actual = 1000.0 * LOSSES.get("ft")(p=p)(actual_g, teacher_factor)
        assert_rel(actual, expected, f"FT loss p={p} x 1000")
        g_exp = torch.autograd.grad(expected, td_translator[0].weight, retain_graph=True)[0]
        g_act = torch.autograd.grad(actual, translator[0].weight, retain_graph=True)[0]
        assert_rel(g_act, g_exp, f"FT loss p={p}: gradient wrt the translator's first conv")


# ------------------------------------------------------------------------------------------------
# Tf-KD: teacher and student of the same architecture
# ------------------------------------------------------------------------------------------------


def test_tfkd_spec_compiles_two_separate_resnet18s_and_trains():
    spec = small_spec("tfkd_resnet18.yaml")
    assert spec.teacher.model == spec.student.model == "torchvision:resnet18"
    assert spec.teacher.weights == "IMAGENET1K_V1" and spec.student.weights is None
    torch.manual_seed(0)
    d = kdgraph.compile(spec).train()

    t_modules, s_modules = {id(m) for m in d.teacher.modules()}, {id(m) for m in d.student.modules()}
    assert not t_modules & s_modules, "teacher and student share modules"
    t_tensors = {id(t) for t in [*d.teacher.parameters(), *d.teacher.buffers()]}
    s_tensors = {id(t) for t in [*d.student.parameters(), *d.student.buffers()]}
    assert not t_tensors & s_tensors, "teacher and student share parameters or buffers"
    assert not any(p.requires_grad for p in d.teacher.parameters())
    assert all(p.requires_grad for p in d.student.parameters())
    assert {id(p) for p in d.trainable_parameters()} == {id(p) for p in d.student.parameters()}

    # the loss equals torchdistill's KDLoss(alpha=0.9, T=1) on the same two networks and batch
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([7, 70])
    out = d(x, y)
    with torch.no_grad():
        z_t = d.teacher(x)
    z_s = d.student(x)
    expected = TdKDLoss("fc", "output", "fc", "output", temperature=1.0, alpha=0.9)(
        {"fc": {"output": z_s}}, {"fc": {"output": z_t}}, y)
    assert_rel(out.loss, expected, "compiled Tf-KD loss vs torchdistill KDLoss(alpha 0.9, T 1)")
    assert_rel(out.logits, z_s, "student logits")

    teacher0 = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    student0 = {k: v.clone() for k, v in d.student.named_parameters()}
    opt = torch.optim.SGD(d.trainable_parameters(), lr=1e-3, momentum=0.9)
    for _ in range(2):
        out = d(x, y)
        assert torch.isfinite(out.loss) and set(out.terms) == {"ce", "kd"}
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(torch.equal(v, teacher0[k]) for k, v in d.teacher.state_dict().items()), "teacher changed"
    assert all(not torch.equal(p, student0[n]) for n, p in d.student.named_parameters())

    # one module object as both teacher and student is refused (self-training needs a separate copy)
    same = torchvision.models.resnet18()
    with pytest.raises(ModelError, match="same module"):
        kdgraph.compile(spec, teacher=same, student=same)
