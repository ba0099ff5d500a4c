"""The frontier methods' ImageNet specs compiled at 64x64 and trained for real steps; the general mechanisms they
brought: loss-weight / loss-argument schedules (kdgraph.spec.schedule, kdgraph.methods.progress) and loss arguments that
name a network's module (OFD's margin_bn)."""
from __future__ import annotations

import pytest
import torch

import kdgraph
from kdgraph.errors import SpecError
from kdgraph.methods.kd import kd_divergence
from kdgraph.methods.registry import LOSSES
from kdgraph.spec.schedule import Schedule
from kdgraph.train import train
from kdgraph.train.checkpoint import Checkpoint
from conftest import assert_rel, sgd_steps_change_only_trained, small_spec
from test_train import QUIET, read_jsonl, tiny_spec

SPECS = ["dkd", "nkd", "ttm", "wttm", "nst", "kdsvd", "ofd", "ctkd", "mlkd"]


@pytest.mark.parametrize("name", SPECS)
def test_imagenet_spec_trains_at_64px(name, batch):
    """Real SGD steps on ResNet-34 -> ResNet-18 at 64x64: every trained parameter (student, OFD's connectors)
    moves, the teacher does not, every term is finite. No method needed a compiler change of its own."""
    d = kdgraph.compile(small_spec(f"{name}_resnet18.yaml")).train()
    d.progress.update(epoch=5, step=0, steps_per_epoch=10, epochs=100)  # past DKD's warm-up
    images, targets = batch
    terms = sgd_steps_change_only_trained(d, images, targets, steps=2, lr=0.05 if name == "ofd" else 1e-3)
    distill = [k for k in terms if k != "ce"]
    assert distill and all(abs(v) > 0 for k in distill for v in terms[k]), terms


def test_ofd_taps_are_pre_relu_and_margins_follow_the_teacher(batch):
    d = kdgraph.compile(small_spec("ofd_resnet18.yaml")).train()
    loss = d.losses["main"]["ofd_layer4"]
    bn = d.teacher.layer4[2].bn2
    taps = d(*batch, return_taps=True).taps
    assert (taps["teacher:layer4.2/add"] < 0).any() and (taps["teacher:layer4.2/add"] > 0).any()  # before the ReLU
    before = loss.margin().clone()
    with torch.no_grad():
        bn.weight.mul_(2.0)
    assert not torch.equal(loss.margin(), before)  # loading teacher weights after compiling is seen


def _tiny_ofd(margin_bn: str) -> dict:
    """TinyCNN's BN outputs (layer3.1) are its pre-ReLU maps; the connector maps width 4 -> 8."""
    losses = [{"name": "ce", "type": "cross_entropy"},
              {"name": "ofd", "type": "ofd", "args": {"margin_bn": margin_bn},
               "inputs": {"student": "adapter:c", "teacher": "teacher:layer3.1"}}]
    spec = tiny_spec(losses=losses)
    spec["adapters"] = {"c": {"type": "ofd_connector", "inputs": {"x": "student:layer3.1"}, "match": "teacher:layer3.1"}}
    spec["stages"][0]["train"] = ["student", "c"]
    return spec


def test_module_arg_errors_name_the_field():
    d = kdgraph.compile(_tiny_ofd("teacher:layer3.1"))
    assert d.losses["main"]["ofd"]._bn[0] is d.teacher.layer3[1]
    with pytest.raises(SpecError, match=r"stages\[0\]\.losses\[1\]\.args\.margin_bn.*no module 'layer3.9'"):
        kdgraph.compile(_tiny_ofd("teacher:layer3.9"))
    with pytest.raises(SpecError, match="affine BatchNorm"):
        kdgraph.compile(_tiny_ofd("teacher:layer3.0"))
    with pytest.raises(SpecError, match="must name a module"):
        kdgraph.compile(_tiny_ofd("teacher:layer3.1@output"))


# ------------------------------------------------------------------------------------------------ schedules
def test_schedule_values():
    warm = Schedule.model_validate({"schedule": "linear_warmup", "epochs": 20, "to": 8.0})
    assert [warm.value(e, s, 10) for e, s in [(0, 0), (0, 5), (10, 0), (19, 9), (20, 0), (50, 3)]] == \
        pytest.approx([0.0, 0.2, 4.0, 8 * 199 / 200, 8.0, 8.0])
    # mdistiller counts epochs from 1: min(epoch / warmup, 1) with warmup 1 is 1 from the first step (no warm-up)
    code = Schedule.model_validate({"schedule": "linear_warmup", "epochs": 1, "to": 1.0, "per": "epoch",
                                    "count_from": 1})
    assert code.value(0, 0, 100) == 1.0
    cos = Schedule.model_validate({"schedule": "cosine", "from": 4.0, "to": 1.0, "epochs": 10, "start": 2})
    assert [cos.value(e, 0, 1) for e in (0, 2, 7, 12, 30)] == pytest.approx([4.0, 4.0, 2.5, 1.0, 1.0])
    assert f"{warm:g}" == "linear_warmup 0 -> 8 over epochs 0..20 (per step)"


def test_scheduled_weight_and_argument_follow_progress():
    """DKD's warm-up is the weight's schedule; a KD temperature annealed 4 -> 1 is an argument's schedule. The
    compiled terms equal the loss at the scheduled value for the progress the distiller is given."""
    spec = small_spec("dkd_resnet18.yaml")
    spec.stages[0].losses.append(kdgraph.spec.schema.LossSpec.model_validate(
        {"name": "kd", "type": "kd", "args": {"temperature": {"schedule": "linear", "from": 4.0, "to": 1.0,
                                                             "epochs": 2, "per": "epoch"}}}))
    d = kdgraph.compile(spec).eval()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([3, 7])
    z_s, z_t = d.student(x), d.teacher(x)
    dkd = LOSSES.get("dkd")(alpha=1.0, beta=0.5, temperature=1.0)(z_s, z_t, y)
    for (epoch, step), w, temp in [((0, 0), 0.0, 4.0), ((0, 25), 0.25, 4.0), ((1, 0), 1.0, 2.5), ((3, 0), 1.0, 1.0)]:
        d.progress.update(epoch=epoch, step=step, steps_per_epoch=100, epochs=100)
        out = d(x, y)
        assert_rel(out.terms["dkd"] + 1.0, w * dkd + 1.0, f"dkd weight at {epoch}/{step}")
        assert_rel(out.terms["kd"], kd_divergence(z_s, z_t, temp), f"kd at temperature {temp}")
        assert d.losses["main"]["kd"].temperature == temp


def test_schedule_errors_name_the_field():
    bad_weight = [{"name": "ce", "type": "cross_entropy"},
                  {"name": "kd", "type": "kd", "weight": {"schedule": "linear_warmup", "epochs": 0, "to": 1.0}}]
    with pytest.raises(SpecError, match=r"stages\[0\]\.losses\[1\]\.weight"):
        kdgraph.load_spec(tiny_spec(losses=bad_weight))
    for temperature, match in [({"schedule": "linear", "from": 4.0, "to": -1.0, "epochs": 2}, "temperature"),
                               ({"schedule": "lin", "to": 1.0, "epochs": 2}, r"args\.temperature.*invalid schedule")]:
        losses = [{"name": "kd", "type": "kd", "args": {"temperature": temperature}}]
        with pytest.raises(SpecError, match=match):
            kdgraph.compile(tiny_spec(losses=losses))


def test_trainer_drives_the_schedule_and_checkpoints_ctkd(tmp_path):
    """kdgraph's trainer updates d.progress before every step: a KD weight warmed up per epoch logs 0 in the first
    epoch and the full term in the second. CTKD's temperature (an adapter with a scheduled grl_lambda) trains with
    the stage and is in the checkpoint (so resume restores it with the other adapters)."""
    losses = [{"name": "ce", "type": "cross_entropy"},
              {"name": "kd", "type": "kd", "inputs": {"temperature": "adapter:ctkd"},
               "weight": {"schedule": "linear_warmup", "epochs": 1, "to": 1.0, "per": "epoch"}}]
    spec = tiny_spec(epochs=2, train_subset=64, val_subset=32, losses=losses)
    spec["adapters"] = {"ctkd": {"type": "ctkd", "args": {
        "grl_lambda": {"schedule": "cosine", "from": 0.0, "to": 1.0, "epochs": 1}}}}
    spec["stages"][0]["train"] = ["student", "ctkd"]
    train(spec, out=tmp_path / "run", **QUIET)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "train"]
    first = [r for r in rows if r["epoch"] == 0]
    second = [r for r in rows if r["epoch"] == 1]
    assert first and second and all(r["terms"]["kd"] == 0 for r in first) and all(r["terms"]["kd"] > 0 for r in second)
    ck = Checkpoint.load(tmp_path / "run" / "last.pt")
    theta = ck.distiller["adapters.ctkd.global_T"]
    assert theta.shape == (1,) and theta.item() != 1.0  # trained in the second epoch (the first has kd weight 0)
