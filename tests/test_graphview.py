"""The networkx view of the fused graph matches the GraphModule it describes, and answers queries."""
from __future__ import annotations

import networkx as nx
import pytest
import torch

import kdgraph
from kdgraph.errors import TapError
from kdgraph.distiller.graphview import collapse, tap_node, tap_to_loss_path, to_networkx
from kdgraph.compiler.nodeinfo import Role, role_of

from conftest import small_spec


@pytest.fixture(scope="module")
def kr():
    torch.manual_seed(0)
    return kdgraph.compile(small_spec("kr_resnet18.yaml"))


@pytest.fixture(scope="module")
def ft():
    torch.manual_seed(0)
    return kdgraph.compile(small_spec("ft_resnet18.yaml"))


def _gm_edges(gm):
    return {(src.name, n.name) for n in gm.graph.nodes for src in n.all_input_nodes}


@pytest.mark.parametrize("which", ["kr", "ft"])
def test_same_nodes_and_edges_as_the_graph_module(which, request):
    d = request.getfixturevalue(which)
    for i in range(len(d.stages)):
        gm, report = d.build_stage(i)
        G = to_networkx(d, i)
        live = {n for n, a in G.nodes(data=True) if not a["pruned"]}
        assert live == {n.name for n in gm.graph.nodes}
        live_edges = {(u, v) for u, v, a in G.edges(data=True) if not a["pruned"]}
        assert live_edges == _gm_edges(gm)
        assert all(u in live and v in live for u, v in live_edges)
        # the pruned nodes are exactly the ones the compiler removed, and none is in the GraphModule
        pruned = {n for n, a in G.nodes(data=True) if a["pruned"]}
        assert pruned == {p["name"] for p in report.pruned_nodes}
        assert pruned and not pruned & {n.name for n in gm.graph.nodes}
        # attributes mirror the fx nodes
        for node in gm.graph.nodes:
            a = G.nodes[node.name]
            assert a["op"] == node.op and a["role"] is role_of(node) and isinstance(a["role"], Role)
            assert a["role"] == a["role"].value  # a str enum: comparing with text still works
            assert a["stage"] == d.stages[i] and isinstance(a["trainable"], bool)
            meta = node.meta.get("tensor_meta")
            if a["role"] in ("teacher", "student"):
                assert a["shape"] == tuple(meta.shape) and a["dtype"] == "float32"
            if node.op == "call_module" and a["role"] in ("teacher", "student", "adapter"):
                mod = gm.get_submodule(node.target)
                assert a["params"] == sum(p.numel() for p in mod.parameters())
                assert a["module_type"] == type(mod).__name__


def test_pruned_nodes_are_wired_as_in_the_traced_teacher(ft):
    G = to_networkx(ft, "main")  # FT taps teacher:layer4; avgpool, flatten and fc are dead
    traced = ft.traced["teacher"].graph_module.graph
    for n, a in G.nodes(data=True):
        if not a["pruned"]:
            continue
        tn = next(t for t in traced.nodes if f"teacher_{t.name}" == n)
        assert {f"teacher_{s.name}" for s in tn.all_input_nodes} == set(G.predecessors(n))
        assert all(G.edges[p, n]["pruned"] for p in G.predecessors(n))
        assert a["role"] == "teacher" and not a["trainable"]
    assert G.nodes["teacher_fc"]["pruned"] and G.nodes["teacher_fc"]["params"] == 512 * 1000 + 1000
    assert G.nodes["teacher_fc"]["shape"] == (2, 1000)
    # the last live teacher node (the tap teacher:layer4) feeds the first pruned one
    assert G.has_edge(G.graph["taps"]["teacher:layer4"], "teacher_avgpool")


def test_every_tap_reaches_the_total_loss(kr, ft):
    for d in (kr, ft):
        for i in range(len(d.stages)):
            G = to_networkx(d, i)
            total = G.graph["loss_node"]
            assert total in G
            report = d.build_stage(i)[1]
            assert {t.tap for t in report.taps} == set(G.graph["taps"])
            for t in report.taps:
                node = tap_node(G, t.tap)
                assert t.tap in G.nodes[node]["taps"]
                path = tap_to_loss_path(G, t.tap)
                assert path[0] == node and path[-1] == total
                assert nx.is_directed_acyclic_graph(G)
            # the total loss feeds the output's "loss" and every weighted term is on the way
            for term in G.graph["terms"].values():
                assert nx.has_path(G, term, total)


def test_taps_are_marked_on_the_edges_that_read_them(kr):
    G = kr.graph
    report = kr.report
    marked = {(u, v): a["taps"] for u, v, a in G.edges(data=True) if a["taps"]}
    # one marked edge per (tap, reader): student:layer4.-1 -> abf_layer4, teacher:layer4.-1 -> hcl_layer4, ...
    assert sum(len(t.used_by) for t in report.taps) == sum(len(v) for v in marked.values())
    u = G.graph["taps"]["student:layer4.-1"]
    assert "student:layer4.-1" in G.edges[u, "adapters_abf_layer4"]["taps"]
    assert G.edges[u, "adapters_abf_layer4"]["shape"] == (2, 512, 2, 2)
    # adapter tuple items carry the adapter's shapes
    item = G.graph["taps"]["adapter:abf_layer4.1"]
    assert G.nodes[item]["owner"] == "abf_layer4" and G.nodes[item]["shape"] == (2, 512, 2, 2)
    assert G.nodes["adapters_abf_layer1"]["shape"] == ((2, 64, 16, 16), (2, 512, 16, 16))
    with pytest.raises(TapError, match="did you mean|Did you mean"):
        tap_node(G, "student:layer4.-2")


def test_trainable_flags_match_real_gradients(ft):
    """Run a real step: a node marked trainable has parameters that receive gradients, a frozen one none."""
    for stage in ("paraphraser", "main"):
        ft.enter_stage(stage).train()
        G = ft.graph
        assert G.graph["stage"] == stage
        for p in ft.parameters():
            p.grad = None
        images, targets = torch.randn(2, 3, 64, 64), torch.randint(0, 1000, (2,))
        ft(images, targets).loss.backward()
        checked = 0
        for n, a in G.nodes(data=True):
            if a["op"] != "call_module" or a["params"] == 0 or a["pruned"]:
                continue
            mod = ft.graph_module.get_submodule(a["target"])
            got = any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())
            assert got == a["trainable"], (stage, n, a["trainable"])
            checked += 1
        assert checked > 10
    enc = [a for a in (to_networkx(ft, i).nodes.get("adapters_paraphraser_encoder") for i in (0, 1))]
    assert [a["trainable"] for a in enc] == [True, False]  # trains in stage 1, frozen in stage 2
    ft.enter_stage(0)


def test_collapse_groups_and_keeps_taps(kr):
    G = kr.graph

    def by_owner(n, a):
        return a["owner"] if a["role"] in ("teacher", "student", "adapter") else None

    H = collapse(G, by_owner)
    assert {"teacher", "student", "abf_layer1", "abf_avgpool"} <= set(H)
    assert H.has_edge("student", "abf_layer3") and "student:layer3.-1" in H.edges["student", "abf_layer3"]["taps"]
    assert H.has_edge("abf_layer4", "abf_layer3")  # the residual chain
    assert not H.has_edge("teacher", "student") and not H.has_edge("student", "teacher")
    assert sum(len(a["members"]) for _, a in H.nodes(data=True)) == sum(
        1 for _, a in G.nodes(data=True) if a["role"] in ("teacher", "student", "adapter"))
