"""kdgraph: knowledge distillation compiled into one torch.fx graph."""
from .errors import KDGraphError, SpecError, TapError, ShapeError, ModelError, TraceError
from .registry import register_adapter, register_loss, register_transform, register_data_wrapper
from .methods.base import Adapter, DistillLoss, InputTransform
from .spec import Spec, load_spec
from .overrides import apply_overrides
from . import data

__version__ = "0.1.0"


def compile(spec, teacher=None, student=None, stage=0):  # noqa: A001 - the library's verb
    """Compile a spec (path, YAML text, dict or Spec) into a :class:`kdgraph.Distiller`."""
    from .distiller import Distiller

    return Distiller.from_spec(spec, teacher=teacher, student=student, stage=stage)


def bench(suite, **kwargs):
    """Run a benchmark suite and return its table (:func:`kdgraph.bench.bench`; runtime, imported on use)."""
    from .bench import bench as run

    return run(suite, **kwargs)


__all__ = ["compile", "bench", "load_spec", "apply_overrides", "data", "Spec", "KDGraphError", "SpecError", "TapError", "ShapeError", "ModelError",
           "TraceError", "register_adapter", "register_loss", "register_transform", "register_data_wrapper",
           "Adapter", "DistillLoss", "InputTransform"]
