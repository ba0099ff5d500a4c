"""Pass (``runtime.chunked_vocab``): a token loss reading a Linear head's logits is computed in chunks of tokens.

For every loss node whose module is a :class:`~kdgraph.methods.token_base.TokenLoss` (its ``forward`` not
overridden: the pass reuses ``token_mask`` / ``per_token`` / ``normalise``) and whose ``student`` or ``teacher``
input is the output of a network's ``nn.Linear`` head (for a loss against the labels, such as ``token_ce``, whose
``per_token`` scores logits against ``targets(labels)``: its ``student`` input) -- the head's own output
(``student:lm_head``), or the model's output when the only ops between are the logit scale / soft-cap its
config declares (``logit_scale``, Cohere; ``final_logit_softcapping``, Gemma2) -- the loss node becomes one call of
:func:`~kdgraph.compiler.chunked_loss.chunked_token_loss` that reads the head's *input* (the final hidden states)
and weight (the shared parameter itself when embeddings are tied), chunk by chunk under activation checkpointing.
The head's nodes are then unused and removed, so the ``B x T x V`` logits are never built; the graph output's
``logits`` entry (the student's logits) becomes ``None`` when it read them. Losses reading the same student head
(``token_ce`` + ``token_kl``: one shift, one vocabulary slice) become one call of
:func:`~kdgraph.compiler.chunked_loss.chunked_token_losses`, which computes each chunk's student logits once for all
of them; each loss node then reads its item of that call.

A side stays dense when its logits are needed anyway (another loss or an adapter reads them, or a network op),
and the report says which and why; the pass knows no method by name.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate

from ...methods.token_base import TokenLoss
from ..chunked_loss import Dense, Head, chunked_token_loss, chunked_token_losses
from ..nodeinfo import NodeInfo, Role, info_of, role_of, set_info
from ..report import PassResult
from .context import PassContext

__all__ = ["NAME", "run"]

NAME = "chunked_vocab"

_aten = torch.ops.aten
_MUL = {_aten.mul.Tensor, _aten.mul.Scalar}
_DIV = {_aten.div.Tensor, _aten.div.Scalar}
_TANH = {_aten.tanh.default}
_LINEAR = {_aten.linear.default}


def _step(n: fx.Node) -> Optional[tuple[str, Optional[float], fx.Node]]:
    """``(op, constant, input)`` of a scale / soft-cap step (``x * c``, ``x / c``, ``tanh(x)``), else ``None``."""
    if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    if n.target in _TANH and len(n.args) == 1:
        return "tanh", None, n.args[0]
    if len(n.args) == 2 and isinstance(n.args[1], (int, float)) and not isinstance(n.args[1], bool):
        op = "mul" if n.target in _MUL else "div" if n.target in _DIV else None
        if op is not None:
            return op, float(n.args[1]), n.args[0]
    return None


def _config_steps(net: nn.Module) -> tuple[list, Optional[float], Optional[float]]:
    """The steps a model's config puts after its head (Cohere scales, then Gemma2 soft-caps) and their constants."""
    cfg = getattr(net, "config", None)
    scale = getattr(cfg, "logit_scale", None)
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None
    cap = float(cap) if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap else None
    steps = ([("mul", scale)] if scale is not None else []) + \
        ([("div", cap), ("tanh", None), ("mul", cap)] if cap is not None else [])
    return steps, scale, cap


class _Head:
    """A Linear head found behind a tapped node: its role, nodes (head first, tapped node last) and parameters."""

    def __init__(self, role: str, nodes: list[fx.Node], hidden: fx.Node, weight, bias, scale, cap, path: str):
        self.role, self.nodes, self.hidden, self.weight, self.bias = role, nodes, hidden, weight, bias
        self.scale, self.cap, self.path = scale, cap, path


def _find_head(gm: fx.GraphModule, ctx: PassContext, top: fx.Node) -> tuple[Optional[_Head], str]:
    """The Linear head whose (scaled / capped) output ``top`` is, or ``None`` and why not."""
    role = role_of(top)
    if role not in (Role.TEACHER, Role.STUDENT) or role.value not in ctx.networks:
        return None, "not a network's node"
    net = ctx.networks[role.value]
    chain, n = [top], top
    while (step := _step(n)) is not None and len(chain) <= 4:
        n = step[2]
        chain.insert(0, n)
    for i, head in enumerate(chain):  # the first Linear from the head end
        if head.op == "call_module":  # fx capture: LMs take named inputs, which only torch.export captures
            return None, f"{head.target} is a module call (fx capture); the pass reads torch.export's aten.linear"
        if head.op != "call_function" or head.target not in _LINEAR or len(head.args) < 2:
            continue
        mod_path = (info_of(head).name or "") if info_of(head) else ""
        x, w = head.args[0], head.args[1]
        b = head.args[2] if len(head.args) > 2 else head.kwargs.get("bias")
        try:
            linear = net.get_submodule(mod_path)
        except AttributeError:
            return None, f"{mod_path or head.name} is not a module of the {role.value}"
        if not isinstance(linear, nn.Linear) or not isinstance(x, fx.Node):
            return None, f"{mod_path} is not an nn.Linear"
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and gm.get_parameter(w.target) is linear.weight):
            return None, f"{mod_path}'s weight is not read as a parameter"
        steps = [(s[0], s[1]) for s in map(_step, chain[i + 1:])]
        expected, scale, cap = _config_steps(net)
        if steps and steps != expected:
            return None, (f"the ops between {mod_path} and the tap ({', '.join(s[0] for s in steps)}) are not the "
                          f"logit scale / soft-cap the {role.value}'s config declares")
        if not steps:
            scale = cap = None
        return _Head(role.value, chain[i:], x, w, b, scale, cap, mod_path), ""
    return None, "not the output of an nn.Linear head"


def _chunkable(gm: fx.GraphModule, n: fx.Node) -> bool:
    """A TokenLoss node over student and teacher logits (its own ``forward``), or over the student's logits and
    the labels (a loss whose ``per_token`` scores logits against ``targets(labels)``: ``token_ce``)."""
    if n.op != "call_module" or role_of(n) is not Role.LOSS:
        return False
    mod = gm.get_submodule(n.target)
    if not isinstance(mod, TokenLoss):
        return False
    if callable(getattr(mod, "targets", None)):
        return {"student", "labels"} <= set(n.kwargs) <= {"student", "labels", "num_tokens"}
    return (type(mod).forward is TokenLoss.forward
            and {"student", "teacher", "labels"} <= set(n.kwargs) <= {"student", "teacher", "labels", "num_tokens"})


def _label(n: fx.Node) -> str:
    """``student:/div``, ``loss mse``: a node as the report names it."""
    info = info_of(n)
    if info is None or info.name is None:
        return n.name
    return f"{info.role}:{info.name}" if info.role.is_network else f"{info.role} {info.name}"


def _side(head: Optional[_Head], node: fx.Node):
    return Dense(node) if head is None else Head(head.hidden, head.weight, head.bias, head.scale, head.cap)


def _groups(gm: fx.GraphModule, plans: list[fx.Node], heads: dict) -> list[list[fx.Node]]:
    """The chunked loss nodes in groups computed together: losses reading the same student head (one ``shift``
    and ``vocab_size``, the same labels) share each chunk's student logits, if every member's inputs exist before
    the group's first node (so the fused call can stand there); any other loss is a group of one."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups: dict[tuple, list[fx.Node]] = {}
    for n in plans:
        s, mod = n.kwargs["student"], gm.get_submodule(n.target)
        key = (s, n.kwargs["labels"], mod.shift, mod.vocab_size) if heads[s][0] is not None else (n,)
        groups.setdefault(key, []).append(n)
    out = []
    for group in groups.values():
        first = min(order[n] for n in group)
        inputs = [a for n in group for a in n.all_input_nodes]
        if len(group) > 1 and any(order[a] > first for a in inputs):
            out += [[n] for n in group]
        else:
            out.append(group)
    return out


def _replace(gm: fx.GraphModule, group: list[fx.Node], heads: dict, chunk_tokens: int) -> None:
    """Replace a group's loss nodes by one chunked call (each member then reads its item of the call's results)."""
    graph, first = gm.graph, group[0]
    s = first.kwargs["student"]
    with graph.inserting_before(first):
        label = " + ".join(info_of(n).name for n in group)   # the call's name (one loss: that loss's)
        mods = tuple(set_info(graph.get_attr(n.target), NodeInfo(Role.LOSS, label, n.target)) for n in group)
        teachers = tuple(None if n.kwargs.get("teacher") is None else
                         _side(heads[n.kwargs["teacher"]][0], n.kwargs["teacher"]) for n in group)
        if len(group) == 1:
            new = graph.call_function(chunked_token_loss, (mods[0], first.kwargs["labels"],
                                                           first.kwargs.get("num_tokens"), chunk_tokens,
                                                           _side(heads[s][0], s), teachers[0]))
            set_info(new, info_of(first).replace(derived_from=first.name))
            items = [new]
        else:
            new = graph.call_function(chunked_token_losses, (mods, first.kwargs["labels"],
                                                             tuple(n.kwargs.get("num_tokens") for n in group),
                                                             chunk_tokens, _side(heads[s][0], s), teachers))
            set_info(new, info_of(first).replace(name=label, module_path=None, derived_from=first.name))
            items = []
            for i, n in enumerate(group):
                items.append(graph.call_function(operator.getitem, (new, i)))
                set_info(items[-1], info_of(n).replace(derived_from=n.name))
    for n, item in zip(group, items):
        n.replace_all_uses_with(item)
        graph.erase_node(n)


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.chunked_vocab is None:
        return PassResult(NAME, False, "off (runtime.chunked_vocab: {chunk_tokens: N} turns it on)", {})
    graph = gm.graph
    losses = [n for n in graph.nodes if _chunkable(gm, n)]
    heads: dict[fx.Node, tuple[Optional[_Head], str]] = {}
    for n in losses:
        for key in ("student", "teacher"):
            if key not in n.kwargs:  # a loss against the labels (targets): the student side alone
                continue
            top = n.kwargs[key]
            if top not in heads:
                head, why = _find_head(gm, ctx, top) if isinstance(top, fx.Node) else (None, "not a node")
                others = [_label(u) for u in top.users if u.op != "output" and u not in losses] if head else []
                heads[top] = (None, f"also read by {', '.join(others)}") if others else (head, why)
    chunked, dense, plans = [], [], []
    for n in losses:
        s, t = n.kwargs["student"], n.kwargs.get("teacher")
        name = info_of(n).name
        for key, top in (("student", s), ("teacher", t)):
            if top is not None and heads[top][0] is None:
                dense.append(f"{name}.{key} dense: {heads[top][1]}")
        if heads[s][0] is None and (t is None or heads[t][0] is None):
            continue
        plans.append(n)
        chunked.append(name)
    fused = []
    for group in _groups(gm, plans, heads):
        _replace(gm, group, heads, ctx.chunked_vocab)
        if len(group) > 1:
            fused.append([info_of(n).name for n in group])
    removed, logits_dropped = [], False
    for top, (head, _) in heads.items():
        if head is None or any(u.op != "output" for u in top.users):
            continue
        for out in [u for u in top.users if u.op == "output"]:
            out.args = map_aggregate(out.args, lambda a: None if a is top else a)
            logits_dropped = True
        for node in reversed(head.nodes):
            if not node.users:
                removed.append(_label(node))
                graph.erase_node(node)
    if not chunked:
        why = f" ({'; '.join(dense)})" if dense else ""
        return PassResult(NAME, False, "no token loss reads a Linear head" + why,
                          {"chunked": [], "fused": [], "dense": dense, "removed": [],
                           "chunk_tokens": ctx.chunked_vocab})
    summary = (f"{', '.join(chunked)} in chunks of {ctx.chunked_vocab} tokens from the final hidden states; "
               + "".join(f"{' + '.join(g)} share one student head pass per chunk; " for g in fused)
               + f"removed {', '.join(removed) or 'no node'}" + ("; out.logits is None" if logits_dropped else "")
               + (f"; kept {'; '.join(dense)}" if dense else ""))
    return PassResult(NAME, True, summary, {"chunked": chunked, "fused": fused, "dense": dense, "removed": removed,
                                            "chunk_tokens": ctx.chunked_vocab, "logits_dropped": logits_dropped})
