"""What a user holds: the :class:`Distiller` (:mod:`~kdgraph.distiller.module`), its networkx view
(:mod:`~kdgraph.distiller.graphview`, ``distiller.graph``) and the data helpers that feed it
(:mod:`~kdgraph.distiller.data`, public as ``kdgraph.data``). Above the compiler, below the runtime."""
from .module import Distiller, DistillerOutput

__all__ = ["Distiller", "DistillerOutput"]
