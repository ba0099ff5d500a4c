"""The one way to capture a network: pick a backend, merge the leaf registry, record shapes at an example input.

``capture(module, role, leaf_types=..., example=...)`` is what compile calls for teacher and student;
``capture_for_spec(spec, role, module)`` does the same with the spec's ``leaf_modules`` and input size (what
``kdgraph inspect SPEC`` needs, so it names exactly what compile accepts). A backend is a module with ``NAME``
and ``capture(module, role, leaf_types, example) -> TracedNetwork``, listed in :data:`BACKENDS`.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..errors import KDGraphError, TraceError
from . import export_backend, fx_backend
from .leaves import leaf_types as _with_registry
from .leaves import spec_leaf_types
from .network import TracedNetwork

__all__ = ["BACKENDS", "capture", "capture_for_spec", "trace_network", "example_input", "device_of"]

#: backend name -> backend module; ``capture: auto`` tries them in this order
BACKENDS: dict[str, ModuleType] = {fx_backend.NAME: fx_backend, export_backend.NAME: export_backend}


def device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU for a module with neither)."""
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def capture(module: nn.Module, role: str, *, leaf_types: Iterable[type] = (),
            example: Optional[Any] = None, backend: str = "fx") -> TracedNetwork:
    """Capture ``module`` as the ``role`` network: every node named for taps, shapes recorded at ``example``
    (a tensor, or a dict of named inputs passed as keyword arguments).

    ``backend``: ``fx``, ``export`` or ``auto`` (fx, and torch.export when fx cannot trace the network or run
    it at ``example``; the fx reason is kept in ``TracedNetwork.fx_error``). ``leaf_types`` (fx only) are called
    as one node, on top of :data:`~kdgraph.capture.leaves.LEAF_MODULES`. Without an ``example`` no shapes are
    recorded (fx only). Raises :class:`~kdgraph.errors.TraceError` with what to do."""
    if backend == "auto":
        if isinstance(example, dict):  # fx traces one positional input; named inputs go through export
            return export_backend.capture(module, role, (), example)
        try:
            return fx_backend.capture(module, role, _with_registry(leaf_types), example)
        except TraceError as e:
            if example is None:
                raise
            fx_failure = e
        try:
            net = export_backend.capture(module, role, (), example)
        except TraceError as e:  # neither could: fx's advice (leaf modules) first, then export's reason
            raise TraceError(f"{fx_failure} torch.export could not capture it either: {e}") from None
        net.fx_error = str(fx_failure).split(". ")[0]
        return net
    if backend not in BACKENDS:
        raise KDGraphError(f"unknown capture backend {backend!r}; backends: auto, {', '.join(BACKENDS)}")
    if backend == fx_backend.NAME and isinstance(example, dict):
        raise TraceError(f"the {role} takes named inputs ({', '.join(example)}), which the fx backend does not "
                         f"capture; use capture: export (or auto) for {role}")
    return BACKENDS[backend].capture(module, role, _with_registry(leaf_types), example)


_DTYPES = {"int64": torch.int64, "int32": torch.int32, "float32": torch.float32, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "bool": torch.bool}


def example_input(spec, module: Optional[nn.Module] = None, batch: int = 2) -> Any:
    """A random batch of the spec's input on the module's device: ``batch x C x H x W``, or for ``input.named``
    a dict of tensors (integers in ``[0, high)``, default high 2; floats from a normal distribution)."""
    device = device_of(module) if module is not None else None
    if spec.input.named:
        out = {}
        for name, ni in spec.input.named.items():
            shape = (batch, *ni.shape)
            dtype = _DTYPES[ni.dtype]
            if dtype.is_floating_point:
                out[name] = torch.randn(shape, device=device).to(dtype)
            elif dtype == torch.bool:
                out[name] = torch.ones(shape, dtype=dtype, device=device)
            else:
                out[name] = torch.randint(0, ni.high or 2, shape, dtype=dtype, device=device)
        return out
    c, (h, w) = spec.input.channels, spec.input.size
    return torch.randn(batch, c, h, w, device=device)


def capture_for_spec(spec, role: str, module: nn.Module, example: Optional[Any] = None) -> TracedNetwork:
    """Capture a spec's ``role`` network as compile does: with the backend ``<role>.capture`` names, honouring
    the spec's ``leaf_modules``, with shapes at ``example`` (default: a random batch of 2 of the spec's input).
    Importing a leaf class outside torch/torchvision/the registry needs the caller's consent
    (:func:`kdgraph.consent`)."""
    if example is None:
        example = example_input(spec, module)
    backend = getattr(spec, role).capture
    return capture(module, role, leaf_types=spec_leaf_types(spec), example=example, backend=backend)


def trace_network(module: nn.Module, role: str, leaf_types: Iterable[type] = ()) -> TracedNetwork:
    """Trace and name ``module`` with the fx backend (registry leaves + ``leaf_types``), without shapes."""
    return fx_backend.trace_network(module, role, _with_registry(leaf_types))
