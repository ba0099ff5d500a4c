"""Registries of losses, adapters, input transforms and data wrappers.

A method is a file under :mod:`kdgraph.methods`, named in :func:`kdgraph.methods.builtin_methods`,
whose classes register themselves here; the compiler, trainer and CLI only look names up, they know
no method by name. This module imports no method: the package :mod:`kdgraph.methods` (always
imported before this module, being its parent) hands it the loader of the built-ins with
:func:`load_builtins_with`, and the first lookup calls it. User code registers its own classes the same way and names them in a spec::

    from kdgraph import register_loss, DistillLoss

    @register_loss("my_cosine")
    class MyCosine(DistillLoss):
        inputs = ("student", "teacher")
        def forward(self, student, teacher):
            return 1 - torch.nn.functional.cosine_similarity(student, teacher).mean()
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from ..errors import SpecError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> class table with clear errors on unknown or duplicate names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, override: bool = False):
        def add(o: T) -> T:
            if name in self._entries and not override and self._entries[name] is not o:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered by {self._entries[name]!r}; "
                    f"pick another name or pass override=True")
            self._entries[name] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str, where: str = "") -> T:
        _load_builtin_methods()
        try:
            return self._entries[name]
        except KeyError:
            at = f"{where}: " if where else ""
            raise SpecError(
                f"{at}unknown {self.kind} {name!r}.{did_you_mean(name, self._entries)} "
                f"Registered {self.kind}s: {', '.join(sorted(self._entries))}.") from None

    def names(self) -> list[str]:
        _load_builtin_methods()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        _load_builtin_methods()
        return name in self._entries


LOSSES: Registry[type] = Registry("loss")
ADAPTERS: Registry[type] = Registry("adapter")
TRANSFORMS: Registry[type] = Registry("transform")
DATA_WRAPPERS: Registry[Callable] = Registry("data wrapper")


def register_loss(name: str, *, override: bool = False):
    """Class decorator: make a :class:`~kdgraph.methods.base.DistillLoss` usable as ``type: name``."""
    return LOSSES.register(name, override=override)


def register_adapter(name: str, *, override: bool = False):
    """Class decorator: make an :class:`~kdgraph.methods.base.Adapter` usable as ``type: name``."""
    return ADAPTERS.register(name, override=override)


def register_transform(name: str, *, override: bool = False):
    """Class decorator: make an :class:`~kdgraph.methods.base.InputTransform` usable as ``type: name``."""
    return TRANSFORMS.register(name, override=override)


def register_data_wrapper(name: str, *, override: bool = False):
    """Decorator for a callable ``(dataset, spec, **args) -> dataset`` that adds per-batch extras."""
    return DATA_WRAPPERS.register(name, override=override)


_builtin_loader: list[Callable[[], object]] = []  # set once by kdgraph.methods, called (then dropped) on first lookup


def load_builtins_with(loader: Callable[[], object]) -> None:
    """Call ``loader`` (which imports the built-in methods) on the first lookup, not before."""
    _builtin_loader[:] = [loader]


def _load_builtin_methods() -> None:
    """Import the built-in methods (:func:`kdgraph.methods.builtin_methods` names them) once."""
    if _builtin_loader:
        _builtin_loader.pop()()
