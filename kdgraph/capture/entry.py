"""The one way to capture a network: pick a backend, merge the leaf registry, record shapes at an example input.

``capture(module, role, leaf_types=..., example=...)`` is what compile calls for teacher and student;
``capture_for_spec(spec, role, module)`` does the same with the spec's ``leaf_modules`` and input size (what
``kdgraph inspect SPEC`` needs, so it names exactly what compile accepts). A backend is a module with ``NAME``
and ``capture(module, role, leaf_types, example) -> TracedNetwork``, listed in :data:`BACKENDS`.
"""
from __future__ import annotations

from types import ModuleType
from typing import Iterable, Optional

import torch
from torch import nn

from ..errors import KDGraphError
from . import fx_backend
from .leaves import leaf_types as _with_registry
from .leaves import spec_leaf_types
from .network import TracedNetwork

__all__ = ["BACKENDS", "capture", "capture_for_spec", "trace_network", "example_input", "device_of"]

#: backend name -> backend module (``torch.export`` will be a sibling of fx_backend)
BACKENDS: dict[str, ModuleType] = {fx_backend.NAME: fx_backend}


def device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU for a module with neither)."""
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def capture(module: nn.Module, role: str, *, leaf_types: Iterable[type] = (),
            example: Optional[torch.Tensor] = None, backend: str = "fx") -> TracedNetwork:
    """Capture ``module`` as the ``role`` network: every node named for taps, shapes recorded at ``example``.

    ``leaf_types`` are called as one node, on top of :data:`~kdgraph.capture.leaves.LEAF_MODULES`. Without an
    ``example`` no shapes are recorded. Raises :class:`~kdgraph.errors.TraceError` with what to do."""
    if backend not in BACKENDS:
        raise KDGraphError(f"unknown capture backend {backend!r}; backends: {', '.join(BACKENDS)}")
    return BACKENDS[backend].capture(module, role, _with_registry(leaf_types), example)


def example_input(spec, module: Optional[nn.Module] = None, batch: int = 2) -> torch.Tensor:
    """A random batch of the spec's input shape (``batch x C x H x W``) on the module's device."""
    c, (h, w) = spec.input.channels, spec.input.size
    return torch.randn(batch, c, h, w, device=device_of(module) if module is not None else None)


def capture_for_spec(spec, role: str, module: nn.Module, example: Optional[torch.Tensor] = None) -> TracedNetwork:
    """Capture a spec's ``role`` network as compile does: honouring the spec's ``leaf_modules``, with shapes at
    ``example`` (default: a random batch of 2 at the spec's input size). Importing a leaf class outside
    torch/torchvision/the registry needs the caller's consent (:func:`kdgraph.consent`)."""
    if example is None:
        example = example_input(spec, module)
    return capture(module, role, leaf_types=spec_leaf_types(spec), example=example)


def trace_network(module: nn.Module, role: str, leaf_types: Iterable[type] = ()) -> TracedNetwork:
    """Trace and name ``module`` with the fx backend (registry leaves + ``leaf_types``), without shapes."""
    return fx_backend.trace_network(module, role, _with_registry(leaf_types))
