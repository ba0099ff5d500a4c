"""DIST: parity of the relation loss with torchdistill 1.1.5's DISTLoss, and the dist_resnet18 spec."""
from __future__ import annotations

import pytest
import torch
import torchvision

from torchdistill.losses.mid_level import DISTLoss as TdDISTLoss

import kdgraph
from kdgraph.errors import ShapeError
from kdgraph.methods.registry import LOSSES
from conftest import assert_rel, small_spec



@pytest.fixture(scope="module")
def logits():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    teacher = torchvision.models.resnet34(num_classes=100).eval()
    student = torchvision.models.resnet18(num_classes=100).eval()
    with torch.no_grad():
        z_t = teacher(x)
    return student(x), z_t


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0), (1.0, 0.0, 2.0)])
def test_dist_matches_torchdistill(logits, beta, gamma, tau):
    z_s, z_t = logits
    z_s = z_s.detach().clone().requires_grad_(True)
    td = TdDISTLoss(".", "output", ".", "output", beta=beta, gamma=gamma, tau=tau)
    expected = td({".": {"output": z_s}}, {".": {"output": z_t}})
    actual = LOSSES.get("dist")(beta=beta, gamma=gamma, tau=tau)(z_s, z_t)
    assert_rel(actual, expected, f"DIST (beta={beta}, gamma={gamma}, tau={tau})")
    (g_exp,) = torch.autograd.grad(expected, z_s)
    (g_act,) = torch.autograd.grad(actual, z_s)
    assert_rel(g_act, g_exp, "DIST gradient wrt the student logits")


def test_dist_is_zero_for_affine_related_predictions():
    """Pearson correlation ignores scale and shift: equal probabilities give 0; the loss stays in [0, 4 tau^2]."""
    torch.manual_seed(1)
    z = torch.randn(6, 10)
    dist = LOSSES.get("dist")()
    assert dist(z, z).abs().item() < 1e-6
    worst = dist(z, -z).item()
    assert 0 < worst <= 4.0
    # inter only / intra only add up to the default
    inter = LOSSES.get("dist")(beta=1.0, gamma=0.0)(z, z.flip(0))
    intra = LOSSES.get("dist")(beta=0.0, gamma=1.0)(z, z.flip(0))
    assert_rel(inter + intra, dist(z, z.flip(0)), "inter + intra")


def test_dist_shape_check_and_args():
    cls = LOSSES.get("dist")
    with pytest.raises(ShapeError) as e:
        cls.check_shapes({"student": (2, 1000), "teacher": (2, 100)},
                         {"student": "student:@output", "teacher": "teacher:@output"}, "stages[0].losses[1]")
    assert "student:@output" in str(e.value) and "teacher:@output" in str(e.value)
    with pytest.raises(ValueError, match="tau"):
        cls(tau=0.0)


# ------------------------------------------------------------------------------------------------
# The spec, compiled and trained
# ------------------------------------------------------------------------------------------------


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_dist_spec_matches_torchdistill_and_trains():
    """specs/dist_resnet18.yaml: CE + 2 * DIST equals torchdistill's weighted sum on the same networks, and
    real SGD steps move every student parameter and nothing of the teacher. No compiler change was needed:
    the method is one file under kdgraph/methods."""
    torch.manual_seed(0)
    d = kdgraph.compile(small_spec("dist_resnet18.yaml")).train()
    assert d.stages == ["main"] and len(d.adapters) == 0
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([1, 10, 100, 999])
    out = d(x, y)
    with torch.no_grad():
        z_t = d.teacher(x)
    z_s = d.student(x)  # train mode, like the graph: batch statistics
    td = TdDISTLoss(".", "output", ".", "output", beta=1.0, gamma=1.0, tau=1.0)
    expected_dist = 2.0 * td({".": {"output": z_s}}, {".": {"output": z_t}})
    expected_ce = torch.nn.functional.cross_entropy(z_s, y)
    assert_rel(out.terms["dist"], expected_dist, "compiled dist term (weight 2)")
    assert_rel(out.terms["ce"], expected_ce, "compiled ce term")
    assert_rel(out.loss, expected_ce + expected_dist, "compiled total")

    teacher0, student0 = _state(d.teacher), _state(d.student)
    opt = torch.optim.SGD(d.trainable_parameters(), lr=1e-3, momentum=0.9)
    assert {id(p) for p in d.trainable_parameters()} == {id(p) for p in d.student.parameters()}
    for _ in range(2):
        out = d(x, y)
        assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.terms.values())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(torch.equal(v, teacher0[k]) for k, v in d.teacher.state_dict().items()), "teacher changed"
    for name, p in d.student.named_parameters():
        assert not torch.equal(p, student0[name]), f"student {name} did not change"
