"""Old module paths and where their code lives now (issue 19's package tree), resolved lazily.

Until the tree was grouped, 14 modules sat at the top of ``kdgraph/``. Users' code, docs, pickles and specs
name some of them (``from kdgraph.registry import register_loss``, ``kdgraph.weights``, a spec's
``leaf_modules: kdgraph.zoo:CenterTapConv2d``), so every old path keeps working through one table: ``import
kdgraph.zoo`` (a :data:`sys.meta_path` finder) and ``kdgraph.zoo`` (the package's ``__getattr__``) give the
module at its new place, the same object, never a copy; nothing is imported before it is asked for.

Specs keep naming the zoo's models ``kdgraph.zoo:NAME``: that is a namespace of the spec language (and part of
a cached teacher's key, :func:`kdgraph.models.weights.pretrain_key`), not an import.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Optional

#: old module path -> (new module path, why it moved there)
MOVED: dict[str, tuple[str, str]] = {
    "kdgraph.zoo": ("kdgraph.models.zoo", "a source of networks, beside torchvision, timm and hf"),
    "kdgraph.timm_support": ("kdgraph.models.timm_support", "a source of networks (timm:NAME)"),
    "kdgraph.hf_support": ("kdgraph.models.hf_support", "a source of networks (hf:CLASS) and their weights"),
    "kdgraph.weights": ("kdgraph.models.weights", "a network's weights: files, cache:NAME, verification"),
    "kdgraph.weightio": ("kdgraph.models.weightio", "reading and writing weight files, under weights"),
    "kdgraph.trust": ("kdgraph.models.trust", "consent to import the code a spec names for a network"),
    "kdgraph.overrides": ("kdgraph.spec.overrides", "dotted overrides of a spec; spec.load applies them"),
    "kdgraph.registry": ("kdgraph.methods.registry", "the methods' registry, beside them; it imports none"),
    "kdgraph.nodeinfo": ("kdgraph.compiler.nodeinfo", "what the compiler records on each fused node"),
    "kdgraph.graphview": ("kdgraph.distiller.graphview", "the networkx view of a Distiller (distiller.graph)"),
    "kdgraph.data": ("kdgraph.distiller.data", "feeding a Distiller: data wrappers and batch unpacking"),
}


def new_path(module: str) -> Optional[str]:
    """Where the code of ``module`` (an old path, or inside one) lives now; None if it did not move."""
    for old, (new, _) in MOVED.items():
        if module == old or module.startswith(old + "."):
            return new + module[len(old):]
    return None


def canonical(module: str) -> str:
    """``module`` with an old path replaced by the new one (as a class's ``__module__`` says it)."""
    return new_path(module) or module


class _OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import kdgraph.<old>``: the module at its new path, registered under the old name as well."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name][0])  # one module: its __name__, __file__ stay
        spec.loader_state = module.__spec__  # the import machinery overwrites __spec__; exec_module gives it back
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module ran at its new path. Its own ``__spec__`` goes back in place."""
        module.__spec__ = module.__spec__.loader_state


_FINDER = _OldPathFinder()


def install() -> None:
    """Put the finder first on :data:`sys.meta_path`, once. It answers only the old paths, and must answer them before
    any other finder (an editable install's, a stale copy) could find an old file at the old place."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def attribute(name: str) -> ModuleType:
    """``kdgraph.<name>`` for an old top-level module name (the package's ``__getattr__``)."""
    old = f"kdgraph.{name}"
    if old not in MOVED:
        raise AttributeError(f"module 'kdgraph' has no attribute {name!r}")
    return importlib.import_module(MOVED[old][0])
