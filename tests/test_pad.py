"""PAD-L2: parity of the variance branch and the loss with torchdistill 1.1.5, and the two PAD specs."""
from __future__ import annotations

import pytest
import torch
import torchvision

from torchdistill.core.forward_hook import ForwardHookManager
from torchdistill.losses.mid_level import PADL2Loss as TdPADL2Loss
from torchdistill.models.wrapper import VarianceBranch4PAD

from kdgraph.errors import ShapeError
from kdgraph.registry import ADAPTERS, LOSSES

REL = 1e-5


def assert_rel(actual, expected, what, rel=REL):
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert scale > 0 and torch.isfinite(actual).all(), what
    assert err <= rel * scale, f"{what}: max abs error {err:.3e} > {rel:g} x {scale:.4e}"


def _torchdistill_pad(tmp_path, batch: int = 8):
    """torchdistill's PAD stage exactly as its official config wires it: hooks, wrapper, loss."""
    torch.manual_seed(0)
    teacher = torchvision.models.resnet34().eval()
    wrapper = VarianceBranch4PAD(torchvision.models.resnet18(),
                                 input_module={"path": "student_model.avgpool", "io": "output"}, feat_dim=512,
                                 var_estimator_ckpt=str(tmp_path / "absent_var_estimator.pt"),
                                 device=torch.device("cpu"), device_ids=None, distributed=False)
    wrapper.train()
    t_mgr, s_mgr = ForwardHookManager("cpu"), ForwardHookManager("cpu")
    t_mgr.add_hook(teacher, "avgpool", requires_input=False, requires_output=True)
    s_mgr.add_hook(wrapper, "student_model.avgpool", requires_input=False, requires_output=True)
    s_mgr.add_hook(wrapper, "var_estimator", requires_input=False, requires_output=True)
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad():
        teacher(x)
    wrapper(x)
    s_io = s_mgr.pop_io_dict()
    wrapper.secondary_forward(s_io)
    for k, v in s_mgr.pop_io_dict().items():
        if v:
            s_io[k] = v
    t_io = t_mgr.pop_io_dict()
    loss = TdPADL2Loss("student_model.avgpool", "avgpool", module_path="var_estimator", eps=1e-6, reduction="mean")
    return wrapper, s_io, t_io, loss(s_io, t_io)


def test_pad_variance_branch_and_loss_match_torchdistill(tmp_path):
    wrapper, s_io, t_io, expected = _torchdistill_pad(tmp_path)
    s_feat = s_io["student_model.avgpool"]["output"]  # B x 512 x 1 x 1 (unflattened, as tapped)
    t_feat = t_io["avgpool"]["output"]

    cls = ADAPTERS.get("pad_variance")
    args = cls.infer_args({}, {"x": tuple(s_feat.shape)}, None)
    assert args == {"in_features": 512}
    branch = cls(**args)
    # same parameter names as torchdistill's var_estimator: its checkpoints load as they are
    branch.load_state_dict(wrapper.var_estimator.state_dict(), strict=True)
    branch.train()
    s_detached = s_feat.detach().clone().requires_grad_(True)
    v = branch(s_detached)
    assert_rel(v, s_io["var_estimator"]["output"], "variance branch output (log-variance)")

    actual = LOSSES.get("pad_l2")(eps=1e-6)(s_detached, t_feat, v)
    assert_rel(actual, expected, "PAD-L2 loss")

    # gradients: wrt the variance branch's Linear and the student embedding
    g_exp_w, g_exp_s = torch.autograd.grad(expected, [wrapper.var_estimator[0].weight, s_feat])
    g_act_w, g_act_s = torch.autograd.grad(actual, [branch[0].weight, s_detached])
    assert_rel(g_act_w, g_exp_w, "PAD-L2 gradient wrt the variance Linear weight")
    assert_rel(g_act_s, g_exp_s, "PAD-L2 gradient wrt the student embedding")


def test_pad_loss_formula_and_sum_reduction():
    torch.manual_seed(3)
    s, t, v = torch.randn(5, 7), torch.randn(5, 7), torch.randn(5, 7) * 0.3
    per_sample = ((t - s) ** 2 / (1e-6 + v.exp()) + v).mean(1)
    pad_mean = LOSSES.get("pad_l2")()
    pad_sum = LOSSES.get("pad_l2")(reduction="sum")
    assert_rel(pad_mean(s, t, v), per_sample.mean(), "pad_l2 mean")
    assert_rel(pad_sum(s, t, v), per_sample.sum(), "pad_l2 sum")
    # v = 0 everywhere: plain MSE (up to eps)
    assert_rel(pad_mean(s, t, torch.zeros_like(v)), ((t - s) ** 2).mean() / (1 + 1e-6), "pad_l2 with v = 0")
    with pytest.raises(ValueError, match="reduction"):
        LOSSES.get("pad_l2")(reduction="none")


def test_pad_shape_errors_name_both_taps():
    cls = LOSSES.get("pad_l2")
    taps = {"student": "student:avgpool", "teacher": "teacher:layer4", "log_variance": "adapter:variance"}
    with pytest.raises(ShapeError) as e:
        cls.check_shapes({"student": (2, 512, 1, 1), "teacher": (2, 512, 2, 2), "log_variance": (2, 512)}, taps,
                         "stages[1].losses[1]")
    msg = str(e.value)
    assert "student:avgpool" in msg and "teacher:layer4" in msg and "[2, 512, 2, 2]" in msg
    # equal feature counts in different layouts are fine (everything is flattened)
    cls.check_shapes({"student": (2, 512, 1, 1), "teacher": (2, 512, 1, 1), "log_variance": (2, 512)}, taps, "x")
    adapter = ADAPTERS.get("pad_variance")
    assert adapter.infer_args({}, {"x": (2, 512, 1, 1)}, (2, 256)) == {"in_features": 512, "out_features": 256}
