"""``kdgraph`` command line: thin commands over the Python API, one module per command family.

Every :class:`~kdgraph.errors.KDGraphError` becomes exit code 2 and one paragraph on stderr
(:class:`~kdgraph.cli.console.KDGraphGroup`). Tables are coloured on a terminal and plain when piped;
``--json`` prints machine-readable output. Commands import their subsystems (torch, training, drawing)
only when they run, so ``kdgraph --help`` stays fast.
"""
from __future__ import annotations

import click

from .bench import bench_cmd
from .cache import cache_teacher_cmd
from .compile import compile_cmd
from .console import KDGraphGroup
from .inspect import inspect_cmd
from .train import eval_cmd, export_cmd, train_cmd
from .tune import tune_cmd
from .viz import viz_cmd

__all__ = ["main"]


@click.group(cls=KDGraphGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdgraph")
def main() -> None:
    """kdgraph: compile a knowledge-distillation spec into one fused torch.fx graph."""


main.add_command(compile_cmd, "compile")
main.add_command(inspect_cmd, "inspect")
main.add_command(train_cmd, "train")
main.add_command(eval_cmd, "eval")
main.add_command(export_cmd, "export")
main.add_command(viz_cmd, "viz")
main.add_command(bench_cmd, "bench")
main.add_command(cache_teacher_cmd, "cache-teacher")
main.add_command(tune_cmd, "tune")
