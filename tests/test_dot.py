"""DOT (optimizer sgd_dot): the same parameter trajectory as mdistiller's DistillationOrientedTrainer, and the
KD + DOT spec trained by kdgraph's trainer (the task / distillation split comes from the fused graph's terms).

Fixture tests/fixtures/dot.json: megvii-research/mdistiller a08d46f10d6102bd6e3f258ca5ac880b020ea259,
mdistiller/engine/dot.py run verbatim as its DOT trainer drives it (`OMP_NUM_THREADS=1 python
/tmp/oracle/make_dot.py tests/fixtures`, torch 2.14.1, CPU, float64): four steps of a linear model, one parameter
(`e`) used by the task loss only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import kdgraph
from kdgraph.errors import TrainingError
from kdgraph.train import train
from kdgraph.train.dot import DOT
from kdgraph.train.optim import build_optimizer
from conftest import assert_rel, small_spec
from test_train import QUIET, tiny_spec

FIXTURE = Path(__file__).parent / "fixtures" / "dot.json"


def test_dot_matches_authors_trainer():
    doc = json.loads(FIXTURE.read_text())
    s = doc["settings"]
    params = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in doc["init"].items()}
    opt = DOT(list(params.values()), lr=s["lr"], momentum=s["momentum"], delta=s["delta"],
              weight_decay=s["weight_decay"])
    w, b, e = params["w"], params["b"], params["e"]
    for i, step in enumerate(doc["steps"]):
        x, zt = torch.tensor(step["x"], dtype=torch.float64), torch.tensor(step["teacher"], dtype=torch.float64)
        y = torch.tensor(step["y"])
        z = x @ w.t() + b
        terms = {"ce": F.cross_entropy(z + e, y),
                 "kd": F.kl_div(torch.log_softmax(z, 1), torch.softmax(zt, 1), reduction="batchmean")}
        opt.step_terms(terms, ["ce"])
        for k, p in params.items():
            assert_rel(p, torch.tensor(step["after"][k], dtype=torch.float64), f"{k} after step {i + 1}", rel=1e-10)
    with pytest.raises(TrainingError, match="step_terms"):
        opt.step()


def test_dot_spec_steps_both_momenta(batch):
    spec = small_spec("dot_resnet18.yaml")
    d = kdgraph.compile(spec).train()
    assert d.task_terms() == ["ce"]
    opt = build_optimizer(spec.stages[0], d.trainable_parameters(), 1e-3)
    assert isinstance(opt, DOT)
    before = {k: v.detach().clone() for k, v in d.student.state_dict().items()}
    teacher = {k: v.detach().clone() for k, v in d.teacher.state_dict().items()}
    for _ in range(2):
        opt.step_terms(d(*batch).terms, d.task_terms())
    assert all(torch.equal(v, teacher[k]) for k, v in d.teacher.state_dict().items())
    for name, p in d.student.named_parameters():
        assert not torch.equal(p, before[name]), name
        assert {"momentum_buffer", "momentum_kd_buffer"} <= set(opt.state[p]), name


def test_trainer_runs_sgd_dot(tmp_path):
    spec = tiny_spec(train_subset=64, val_subset=32)
    spec["stages"][0]["optimizer"] = {"type": "sgd_dot", "lr": 0.05, "momentum": 0.9, "delta": 0.075}
    res = train(spec, out=tmp_path / "run", **QUIET)
    assert res["student"]["top1"] >= 0
    spec["stages"][0]["losses"] = [{"name": "ce", "type": "cross_entropy"}]
    with pytest.raises(TrainingError, match="sgd_dot needs task terms and distillation terms"):
        train(spec, out=tmp_path / "ce_only", **QUIET)


def test_delta_leaves_other_optimizers_cache_keys_alone():
    """A cached teacher's key hashes its pretraining settings: the new `delta` field must not change the key of a
    plain sgd pretraining (every cached teacher would be retrained), but does change an sgd_dot one."""
    from kdgraph.weights import pretrain_key

    spec = kdgraph.load_spec(Path(__file__).resolve().parents[1] / "specs" / "fashion_mnist" / "kd.yaml")
    key = pretrain_key(spec.teacher, spec)
    spec.teacher.pretrain.optimizer.delta = 0.2
    assert pretrain_key(spec.teacher, spec) == key
    spec.teacher.pretrain.optimizer.type = "sgd_dot"
    k1 = pretrain_key(spec.teacher, spec)
    spec.teacher.pretrain.optimizer.delta = 0.1
    assert k1 != pretrain_key(spec.teacher, spec) != key


@pytest.mark.parametrize("change, shown", [({"delta": 0.15}, "momentum 0.9, delta 0.15"),
                                           ({"momentum": 0.05}, "momentum 0.05, delta 0.075")])
def test_spec_refuses_momenta_outside_0_1(change, shown):
    """DOT's task and distillation momenta (momentum -/+ delta) must lie in [0, 1]: refused when the spec loads (one
    paragraph naming the field), so a tuning space whose range crosses it is refused before any trial runs."""
    import yaml

    from kdgraph.errors import SpecError

    path = Path(__file__).resolve().parents[1] / "specs" / "fashion_mnist" / "dot.yaml"
    data = yaml.safe_load(path.read_text())
    data["stages"][0]["optimizer"].update(change)
    with pytest.raises(SpecError, match=r"stages\[0\]\.optimizer: sgd_dot \(DOT\) needs 0 <= delta <= momentum") as e:
        kdgraph.load_spec(data)
    assert shown in str(e.value)
