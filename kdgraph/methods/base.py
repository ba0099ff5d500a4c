"""Base classes for the pieces a method contributes: losses, adapters and input transforms, and the
:class:`Batch` a data wrapper's dataset builds (CRD's indices ride in its ``extras``).

The compiler binds each name in ``inputs`` to one tap of the spec and calls ``forward`` with the
tapped tensors as keyword arguments, in that order. It asks the class, before building anything,
whether the traced shapes fit (:meth:`DistillLoss.check_shapes`) and which constructor arguments
follow from them (:meth:`Adapter.infer_args`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

import torch
from pydantic import BaseModel
from torch import nn

from ..errors import ShapeError

Shape = tuple[int, ...]


def _fmt(shape: Shape | None) -> str:
    return "?" if shape is None else "[" + ", ".join(str(s) for s in shape) + "]"


class DistillLoss(nn.Module):
    """A loss term. Subclasses set ``inputs`` (the names of ``forward``'s arguments).

    Class attributes:

    * ``inputs``: argument names, each bound to a tap (``losses[i].inputs`` in the spec).
    * ``default_inputs``: taps used when the spec leaves an input out.
    * ``same_shape``: groups of inputs whose shapes must be equal (checked at compile time).
    * ``batch_only_inputs``: inputs that must be bound to a ``batch:`` tap (labels, sample indices),
      never to a network's or adapter's values.
    * ``optional_batch_inputs``: batch-only inputs a batch may leave out (forward's default, None, applies): the
      token losses' ``num_tokens``, which kdgraph's trainer fills with the optimizer step's count.
    * ``same_vocabulary``: True for a loss comparing the networks token by token (the token losses): both must
      use one tokenizer (:mod:`kdgraph.compiler.vocabulary`; its ``vocab_size`` arg is the tokenizer's size).
    * ``soft_target_inputs``: inputs that accept soft targets (float ``B x num_classes`` probabilities, which
      ``data.augment`` mixup / cutmix put in ``batch:targets``) as well as class indices. A loss with an input bound
      to ``batch:targets`` that is not listed here is refused at compile time when the spec mixes.
    * ``batch_keys``: extra per-batch keys (beyond ``images``/``targets``) the loss reads; those of
      ``default_inputs`` count too.
    * ``Args``: the pydantic schema of the constructor's arguments (see :mod:`kdgraph.methods.args`).
    * ``module_args``: arguments whose spec value names a module of a network (``teacher:layer4.2.bn2``, the
      tap grammar without ``@``/``#``); the compiler passes that module to the constructor (OFD's margins read
      the teacher's BatchNorm). The loss must not register it as a submodule.
    * ``task_term``: True for the task's own loss (cross-entropy with the labels), False for distillation terms;
      term-wise optimizers (DOT) step the two kinds apart.
    """

    inputs: ClassVar[tuple[str, ...]] = ()
    default_inputs: ClassVar[Mapping[str, str]] = {}
    same_shape: ClassVar[tuple[tuple[str, ...], ...]] = ()
    batch_only_inputs: ClassVar[tuple[str, ...]] = ()
    optional_batch_inputs: ClassVar[tuple[str, ...]] = ()
    same_vocabulary: ClassVar[bool] = False
    soft_target_inputs: ClassVar[tuple[str, ...]] = ()
    batch_keys: ClassVar[tuple[str, ...]] = ()
    module_args: ClassVar[tuple[str, ...]] = ()
    task_term: ClassVar[bool] = False
    Args: ClassVar[Optional[type[BaseModel]]] = None

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Shape | None], taps: Mapping[str, str], where: str) -> None:
        """Raise :class:`ShapeError` naming both taps and both shapes when a ``same_shape`` group differs."""
        for group in cls.same_shape:
            known = [(n, shapes.get(n)) for n in group if shapes.get(n) is not None]
            for (n0, s0), (n1, s1) in zip(known, known[1:]):
                if tuple(s0) != tuple(s1):
                    raise ShapeError(
                        f"{where}: inputs {n0!r} ({taps[n0]}, shape {_fmt(s0)}) and {n1!r} "
                        f"({taps[n1]}, shape {_fmt(s1)}) must have the same shape for {cls.__name__}. "
                        f"Tap layers whose outputs match, or put an adapter in between.")


class Adapter(nn.Module):
    """A trainable (or frozen) module between taps and losses: connectors, heads, paraphrasers.

    ``inputs`` names ``forward``'s arguments, each bound to a tap. ``infer_args`` fills channel
    arguments the spec leaves out, from the input shapes and the optional ``match`` tap's shape
    (the shape the adapter's output must have).
    """

    inputs: ClassVar[tuple[str, ...]] = ("x",)
    #: the pydantic schema of the constructor's arguments; arguments ``infer_args`` fills are optional in it
    Args: ClassVar[Optional[type[BaseModel]]] = None

    @classmethod
    def infer_args(cls, args: dict[str, Any], input_shapes: Mapping[str, Shape], match_shape: Shape | None) -> dict[str, Any]:
        return dict(args)


class FlatInputAdapter(Adapter):
    """An adapter that flattens its input ``x`` from dim 1: ``in_features`` follows from the tap's shape."""

    @classmethod
    def infer_args(cls, args: dict[str, Any], input_shapes: Mapping[str, Shape], match_shape: Shape | None) -> dict[str, Any]:
        args = dict(args)
        require_arg(args, "in_features", flat_features(input_shapes["x"]))
        return args


class InputTransform(nn.Module):
    """Applied to the batch's images before both networks (e.g. SSKD's four rotated views).

    ``forward(images) -> images``; may change the batch dimension. Targets are left as they are.
    """

    Args: ClassVar[Optional[type[BaseModel]]] = None


def channels(shape: Shape, what: str) -> int:
    """Channel count of an ``N x C x ...`` shape, with a clear error for a shape that has none."""
    if len(shape) < 2:
        raise ShapeError(f"{what}: expected a tensor with a channel dimension, got shape {_fmt(shape)}")
    return int(shape[1])


def flat_features(shape: Shape) -> int:
    """Number of features of ``N x ...`` once flattened from dim 1."""
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n


def require_arg(args: dict[str, Any], key: str, value: Any) -> None:
    """Set ``args[key] = value`` unless the spec gave it."""
    if args.get(key) is None:
        args[key] = value


@dataclass
class Batch:
    """An already collated batch (the in-memory datasets and data wrappers build whole batches at once).

    ``extras`` holds a data wrapper's per-batch inputs (CRD's ``index`` and ``contrast_index``)."""

    images: torch.Tensor
    targets: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def check_reduction(reduction: str) -> str:
    """A loss's ``reduction`` argument, checked: 'mean' or 'sum' (a ValueError otherwise, for direct Python use;
    a spec's args are checked by the loss's ``Args`` schema first)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return reduction
