"""PAD-L2: parity of the variance branch and the loss with torchdistill 1.1.5, and the two PAD specs."""
from __future__ import annotations

import pytest
import torch

from torchdistill.core.forward_hook import ForwardHookManager
from torchdistill.losses.mid_level import PADL2Loss as TdPADL2Loss
from torchdistill.models.wrapper import VarianceBranch4PAD

import kdgraph
from kdgraph.errors import ShapeError
from kdgraph.methods.registry import ADAPTERS, LOSSES
from conftest import SPECS, assert_rel, sgd_steps_change_only_trained, small_spec



@pytest.fixture(scope="module")
def pad(tmp_path_factory):
    """The compiled two-stage pad_l2_resnet18 spec (64 x 64) and torchdistill's PAD stage on the same networks,
    wired as its official config: hooks on student_model.avgpool / var_estimator / teacher avgpool,
    VarianceBranch4PAD around the same student, PADL2Loss(eps=1e-6, mean). torchdistill's variance branch
    weights are copied into the distiller's `variance` adapter."""
    torch.manual_seed(0)
    d = kdgraph.compile(small_spec("pad_l2_resnet18.yaml"), stage="pad").train()
    wrapper = VarianceBranch4PAD(d.student, input_module={"path": "student_model.avgpool", "io": "output"},
                                 feat_dim=512, var_estimator_ckpt=str(tmp_path_factory.mktemp("pad") / "absent.pt"),
                                 device=torch.device("cpu"), device_ids=None, distributed=False)
    wrapper.train()
    d.adapters["variance"].load_state_dict(wrapper.var_estimator.state_dict(), strict=True)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([5, 6, 7, 8])

    out = d(x, y)  # kdgraph first: torchdistill's hooks go on the same modules below

    t_mgr, s_mgr = ForwardHookManager("cpu"), ForwardHookManager("cpu")
    t_mgr.add_hook(d.teacher, "avgpool", requires_input=False, requires_output=True)
    s_mgr.add_hook(wrapper, "student_model.avgpool", requires_input=False, requires_output=True)
    s_mgr.add_hook(wrapper, "var_estimator", requires_input=False, requires_output=True)
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
    loss = TdPADL2Loss("student_model.avgpool", "avgpool", module_path="var_estimator", eps=1e-6, reduction="mean")
    return {"d": d, "wrapper": wrapper, "s_io": s_io, "t_io": t_io, "expected": loss(s_io, t_io), "out": out,
            "ce": torch.nn.functional.cross_entropy(logits, y), "x": x, "y": y}


def test_pad_variance_branch_and_loss_match_torchdistill(pad):
    wrapper, s_io, t_io, expected = pad["wrapper"], pad["s_io"], pad["t_io"], pad["expected"]
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
    g_exp_w, g_exp_s = torch.autograd.grad(expected, [wrapper.var_estimator[0].weight, s_feat], retain_graph=True)
    g_act_w, g_act_s = torch.autograd.grad(actual, [branch[0].weight, s_detached])
    assert_rel(g_act_w, g_exp_w, "PAD-L2 gradient wrt the variance Linear weight")
    assert_rel(g_act_s, g_exp_s, "PAD-L2 gradient wrt the student embedding")


def test_pad_stage_of_the_spec_matches_torchdistill_end_to_end(pad):
    out = pad["out"]
    assert pad["d"].stage == "pad" and set(out.terms) == {"ce", "pad_l2"}
    assert_rel(out.terms["ce"], pad["ce"], "compiled CE term")
    assert_rel(out.terms["pad_l2"], pad["expected"], "compiled pad_l2 term")
    assert_rel(out.loss, pad["ce"] + pad["expected"], "compiled PAD total loss")


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


# ------------------------------------------------------------------------------------------------
# The specs, compiled and trained
# ------------------------------------------------------------------------------------------------


def test_pad_l2_spec_trains_both_stages_and_keeps_the_variance_branch(pad):
    d = pad["d"]
    assert d.stages == ["l2", "pad"]
    variance = d.adapters["variance"]
    x, y = pad["x"][:2], pad["y"][:2]

    d.enter_stage("l2").train()
    # stage l2 trains the student only; the variance branch (not in the graph) stays as it was
    assert set(sgd_steps_change_only_trained(d, x, y)) == {"ce", "l2"}
    assert not variance.training

    d.enter_stage(1).train()
    assert d.stage == "pad" and d.adapters["variance"] is variance  # adapters persist across stages
    assert variance.training and not d.teacher.training
    assert set(sgd_steps_change_only_trained(d, x, y)) == {"ce", "pad_l2"}


def test_pad_from_l2_checkpoint_spec(pad):
    spec = small_spec("pad_from_l2_checkpoint.yaml")
    # init_from is relative to the spec's folder, not the working directory
    assert spec.init_from == str((SPECS / "checkpoints" / "l2_resnet18" / "best.pt").resolve())
    two_stage = kdgraph.load_spec(SPECS / "pad_l2_resnet18.yaml")
    assert spec.stages[0].model_dump() == two_stage.stage("pad").model_dump()
    assert spec.adapters == two_stage.adapters

    torch.manual_seed(1)
    d = kdgraph.compile(spec).train()
    assert d.stages == ["pad"] and sorted(d.adapters) == ["variance"]
    terms = sgd_steps_change_only_trained(d, pad["x"][:2], pad["y"][:2])
    assert set(terms) == {"ce", "pad_l2"}
