"""Capturing a network as a graph whose every node has a tap name: the layer between torch and the compiler.

* :mod:`.network`: :class:`TracedNetwork`, the name index and tap resolution (with did-you-mean);
* :mod:`.leaves`: the leaf-module registry (:func:`register_leaf_module`, each entry with its reason);
* :mod:`.fx_backend`: torch.fx symbolic tracing with scopes, and shape propagation on fake tensors;
* :mod:`.export_backend`: torch.export (non-strict) for what fx cannot trace, rewritten over the user's module;
* :mod:`.entry`: :func:`capture` (what compile calls) and :func:`capture_for_spec` (with the spec's
  ``leaf_modules``, what ``kdgraph inspect`` calls).
"""
from .entry import BACKENDS, capture, capture_for_spec, device_of, example_input, trace_network
from .fx_backend import propagate_shapes
from .leaves import LEAF_MODULES, leaf_types, register_leaf_module, spec_leaf_types
from .network import ModuleCall, TracedNetwork

__all__ = ["BACKENDS", "capture", "capture_for_spec", "device_of", "example_input", "trace_network",
           "propagate_shapes", "LEAF_MODULES", "leaf_types", "register_leaf_module", "spec_leaf_types",
           "ModuleCall", "TracedNetwork"]
