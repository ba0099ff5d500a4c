"""The compiler: two captured networks + a spec -> one fused ``torch.fx.GraphModule`` per stage.

It knows no method by name. Its files are its pipeline:

* :mod:`.prepare`: once per spec, build adapters / losses / transforms from the registry, bind their inputs to
  taps, check shapes and wiring (:class:`Prepared`);
* :mod:`.fuse`: write one stage's graph (networks, taps, adapters, losses, output), every node with a
  :class:`~kdgraph.compiler.nodeinfo.NodeInfo`;
* :mod:`.passes`: rewrite it, in the order :data:`~kdgraph.compiler.passes.PASSES` lists (in-place safety,
  teacher pruning, the teacher's BatchNorm folding, layout and precision, teacher no-grad, cleanup);
* :mod:`.report`: what was built and what each pass changed (:class:`StageReport`);
* :mod:`.pipeline`: :func:`build_stage` runs the three for one stage.

The teacher's parameters are frozen by the distiller, so no autograd graph is ever recorded for it.
"""
from .fuse import FusedStage, fuse_stage
from .passes import PASSES, PassContext, run_passes, teacher_grad_off, teacher_grad_restore
from .pipeline import build_stage, stage_report, with_tap_outputs
from .prepare import Prepared, bind_inputs
from .report import AdapterReport, LossReport, PassResult, Shape, StageReport, TapReport

__all__ = ["build_stage", "stage_report", "with_tap_outputs", "Prepared", "bind_inputs", "FusedStage", "fuse_stage",
           "PASSES", "PassContext", "run_passes", "teacher_grad_off", "teacher_grad_restore", "AdapterReport",
           "LossReport", "PassResult", "Shape", "StageReport", "TapReport"]
