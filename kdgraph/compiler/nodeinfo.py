"""Typed information about each node of a fused graph: its role, its name, the module that computes it.

The fuser sets one frozen :class:`NodeInfo` per node it creates (``node.meta["kdgraph"]``); passes that insert
nodes give them the info of the value they stand in for (:func:`derive`). Readers (the networkx view, the
drawing, the compile summary) call :func:`info_of` / :func:`role_of` and compare against :class:`Role`; nobody
reads the metadata dict by hand.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch.fx as fx

__all__ = ["Role", "NodeInfo", "META_KEY", "info_of", "role_of", "set_info", "derive"]

META_KEY = "kdgraph"


class Role(str, Enum):
    """What a node of a fused graph is part of. A ``str`` enum: ``Role.LOSS == "loss"`` and JSON prints the text."""

    INPUT = "input"          # a batch entry: images, targets, or a declared per-batch input (CRD's indices)
    TRANSFORM = "transform"  # a stage's input transform (SSKD's rotations)
    TEACHER = "teacher"      # a node copied from the traced teacher
    STUDENT = "student"      # a node copied from the traced student
    ADAPTER = "adapter"      # an adapter call, or an item of its tuple output
    LOSS = "loss"            # a loss call, its weighting, the running total
    OUTPUT = "output"        # the graph's output
    GRAD_MODE = "grad_mode"  # switches autograd off (or autocast on) around the teacher's nodes and back

    def __str__(self) -> str:  # f"{role}" prints "loss", not "Role.LOSS"
        return self.value

    @property
    def is_network(self) -> bool:
        return self in (Role.TEACHER, Role.STUDENT)


@dataclass(frozen=True)
class NodeInfo:
    """What the fuser knows about one node.

    ``name``: tap-style name (``layer1.0.conv1``, ``layer1.0/add``, ``batch:images``, the adapter or loss
    name, ``0.5 * kd``, ``total``). ``module_path``: the module whose call this node is (``layer1.0.conv1``,
    ``adapters.<name>``, ``losses.<stage>.<name>``), ``None`` for functional ops. ``trainable``: the node is an
    adapter the stage optimises. ``derived_from``: for a node a pass inserted, the name of the node it stands in
    for (a clone before an in-place op, a folded convolution).
    """

    role: Role
    name: Optional[str] = None
    module_path: Optional[str] = None
    trainable: bool = False
    derived_from: Optional[str] = None

    def replace(self, **changes) -> "NodeInfo":
        return dataclasses.replace(self, **changes)


def info_of(node: fx.Node) -> Optional[NodeInfo]:
    """The node's :class:`NodeInfo`, or ``None`` for a node nobody described."""
    info = node.meta.get(META_KEY)
    return info if isinstance(info, NodeInfo) else None


def role_of(node: fx.Node) -> Optional[Role]:
    info = info_of(node)
    return info.role if info is not None else None


def set_info(node: fx.Node, info: NodeInfo) -> fx.Node:
    """Describe ``node`` (returns it, for chaining)."""
    if not isinstance(info, NodeInfo):
        raise TypeError(f"set_info expects a NodeInfo, got {type(info).__name__}")
    node.meta[META_KEY] = info
    return node


def derive(new: fx.Node, source: fx.Node, suffix: Optional[str] = None) -> fx.Node:
    """Give a node a pass inserted the info of the node it stands in for (its role and owner)."""
    base = info_of(source)
    if base is None:
        return new
    name = f"{base.name}/{suffix}" if suffix and base.name else base.name
    return set_info(new, base.replace(name=name, derived_from=source.name))
