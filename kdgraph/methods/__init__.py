"""One file per distillation method. Each file registers its losses and adapters in
:mod:`kdgraph.registry`; :mod:`kdgraph.methods.base` holds the small base classes."""
