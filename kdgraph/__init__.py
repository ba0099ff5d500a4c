"""kdgraph: knowledge distillation compiled into one torch.fx graph.

The package reads as the pipeline: spec -> models -> capture -> methods / compiler -> distiller -> train / bench /
viz -> cli (README's "Architecture"). Modules that moved keep their old paths (:mod:`kdgraph._moved`).
"""
from . import _moved
from .errors import KDGraphError, SpecError, TapError, ShapeError, ModelError, TraceError
from .methods.registry import register_adapter, register_loss, register_transform, register_data_wrapper
from .methods.base import Adapter, DistillLoss, InputTransform
from .spec import Spec, load_spec
from .spec.overrides import apply_overrides
from .models import register_model
from .capture import register_leaf_module
from .models.trust import ConsentError, consent

__version__ = "0.1.0"

_moved.install()


def __getattr__(name: str):
    """``kdgraph.data`` and the old top-level modules (``kdgraph.zoo``, ``kdgraph.registry``, ...), imported on use."""
    return _moved.attribute(name)


def compile(spec, teacher=None, student=None, stage=0, allow_imports=None, trust_code=False):  # noqa: A001
    """Compile a spec (path, YAML text, dict or Spec) into a :class:`kdgraph.Distiller`.

    ``allow_imports`` (module prefixes) / ``trust_code`` let the spec import your own code (see
    :mod:`kdgraph.models.trust`); without them it names only torchvision, kdgraph.zoo and registered models.
    """
    from .distiller import Distiller

    return Distiller.from_spec(spec, teacher=teacher, student=student, stage=stage, allow_imports=allow_imports,
                               trust_code=trust_code)


def bench(suite, **kwargs):
    """Run a benchmark suite and return its table (:func:`kdgraph.bench.bench`; runtime, imported on use)."""
    from .bench import bench as run

    return run(suite, **kwargs)


__all__ = ["compile", "bench", "load_spec", "apply_overrides", "data", "Spec", "KDGraphError", "SpecError", "TapError", "ShapeError", "ModelError",
           "TraceError", "register_adapter", "register_loss", "register_transform", "register_data_wrapper",
           "Adapter", "DistillLoss", "InputTransform", "register_model", "register_leaf_module", "ConsentError", "consent"]
