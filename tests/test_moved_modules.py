"""Old module paths keep working after issue 19's package tree (kdgraph/_moved.py): each old path imports, as a
submodule and as an attribute of kdgraph, and gives the very module at its new place; a spec's ``kdgraph.zoo:...``
names and a cached teacher's key are unchanged."""
from __future__ import annotations

import importlib
import sys

import kdgraph
from kdgraph import _moved
from conftest import ROOT


def test_every_old_path_is_the_module_at_its_new_place():
    assert len(_moved.MOVED) == 11
    for old, (new, reason) in _moved.MOVED.items():
        assert len(reason) > 20, old  # each entry says why it moved
        assert not (ROOT / (old.replace(".", "/") + ".py")).exists(), old  # only the table answers the old path
        module = importlib.import_module(new)
        assert importlib.import_module(old) is module and sys.modules[old] is module, old
        assert getattr(kdgraph, old.rpartition(".")[2]) is module, old
        assert module.__name__ == new and module.__spec__.name == new, old  # the alias did not rename it


def test_old_import_statements_give_the_same_objects():
    """What users' code, docs and examples wrote before the move."""
    from kdgraph.data import Batch, wrap
    from kdgraph.graphview import to_networkx
    from kdgraph.registry import LOSSES, register_loss
    from kdgraph.weights import pretrain_key
    from kdgraph.zoo import resnet18_small
    import kdgraph.nodeinfo
    import kdgraph.overrides
    import kdgraph.trust
    from kdgraph.compiler import nodeinfo
    from kdgraph.distiller import data, graphview
    from kdgraph.methods import base, registry
    from kdgraph.models import weights, zoo

    assert register_loss is registry.register_loss and LOSSES is registry.LOSSES
    assert resnet18_small is zoo.resnet18_small and pretrain_key is weights.pretrain_key
    assert to_networkx is graphview.to_networkx and wrap is data.wrap and Batch is base.Batch
    assert kdgraph.trust.consent is kdgraph.consent and kdgraph.overrides.apply_overrides is kdgraph.apply_overrides
    assert kdgraph.nodeinfo is nodeinfo and "kd" in LOSSES  # the built-in methods load on a lookup through any path


def test_a_spec_still_names_the_zoo_and_a_cached_teacher_keeps_its_key():
    from kdgraph.models import build_model
    from kdgraph.models.weights import pretrain_key
    from kdgraph.models.zoo import CenterTapConv2d, tiny_cnn
    from kdgraph.capture.leaves import import_object

    spec = kdgraph.load_spec({
        "name": "moved", "input": {"size": [28, 28], "channels": 1, "num_classes": 10},
        "teacher": {"model": "kdgraph.zoo:resnet34_small",
                    "kwargs": {"in_channels": 1, "num_classes": 10, "stem": "s2", "width": 16},
                    "weights": "cache:fashion_mnist_resnet34_w16",
                    "pretrain": {"epochs": 6, "batch_size": 128, "optimizer": {"type": "sgd", "lr": 0.1}}},
        "student": {"model": "kdgraph.zoo:tiny_cnn", "kwargs": {"width": 4}},
        "data": {"dataset": "fashion_mnist"},
        "stages": [{"name": "main", "optimizer": {"lr": 0.1}, "losses": [{"name": "ce", "type": "cross_entropy"}]}]})
    assert type(build_model(spec.student, "student")) is type(tiny_cnn(width=4))
    # the key in a cached teacher's file name, as commit a232d9c (before the move) computed it for this spec
    # (`pretrain_key(spec.teacher, spec)` run from `git archive a232d9c`): a changed key would orphan the teachers
    # that users' caches already hold, and retrain them
    assert pretrain_key(spec.teacher, spec) == "f2cf235e"
    # a spec's leaf module named by the old path is the class at its new place, known without consent
    assert import_object("kdgraph.zoo:CenterTapConv2d", "leaf_modules[0].module") is CenterTapConv2d
