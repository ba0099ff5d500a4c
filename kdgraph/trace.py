"""Old home of the capture layer, kept for the imports that still use it; see :mod:`kdgraph.capture`."""
from .capture import (LEAF_MODULES, ModuleCall, TracedNetwork, propagate_shapes,  # noqa: F401
                      register_leaf_module, trace_network)

__all__ = ["LEAF_MODULES", "ModuleCall", "TracedNetwork", "propagate_shapes", "register_leaf_module",
           "trace_network"]
