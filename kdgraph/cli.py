"""``kdgraph`` command line: thin commands over the Python API.

Every :class:`~kdgraph.errors.KDGraphError` becomes exit code 2 and one paragraph on stderr.
Tables are coloured on a terminal and plain when piped; ``--json`` prints machine-readable output.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import click

from .errors import KDGraphError
from .trust import consent_options


def _console(stderr: bool = False):
    from rich.console import Console

    tty = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(stderr=stderr, highlight=False, width=None if tty else 120,
                   no_color=not tty or bool(os.environ.get("NO_COLOR")))


def fmt_shape(shape: Any) -> str:
    """``(2, 512, 7, 7)`` -> ``[B, 512, 7, 7]`` (shapes are traced at batch 2)."""
    if shape is None:
        return "?"
    if isinstance(shape, (tuple, list)) and shape and isinstance(shape[0], (tuple, list, type(None))):
        return "(" + ", ".join(fmt_shape(s) for s in shape) + ")"
    dims = list(shape)
    return "[" + ", ".join(["B", *map(str, dims[1:])] if dims else []) + "]"


def _fmt_count(n: int) -> str:
    return f"{n:,}"


class _Group(click.Group):
    """Turns KDGraphError into exit 2 with a clean message (no traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KDGraphError as e:
            _console(stderr=True).print(f"[bold red]error:[/] {e}", markup=True, soft_wrap=True)
            sys.exit(2)
        except OSError as e:  # disk full, permissions, ... where no kdgraph code caught it first
            where = f" ({e.filename})" if e.filename else ""
            from rich.markup import escape

            _console(stderr=True).print(f"[bold red]error:[/] {escape(str(e.strerror or e))}{escape(where)}: the "
                                        f"operating system refused a file operation; check the path, permissions "
                                        f"and free space.", markup=True, soft_wrap=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdgraph")
def main() -> None:
    """kdgraph: compile a knowledge-distillation spec into one fused torch.fx graph."""


def _override_input(spec, input_size: Optional[tuple[int, int]]):
    if input_size:
        spec.input.size = tuple(input_size)
    return spec


# ------------------------------------------------------------------------------ compile
def compile_summary(distiller) -> dict[str, Any]:
    """The compile summary as plain data (what ``--json`` prints)."""
    out: dict[str, Any] = {"spec": distiller.spec.name, "input": distiller.spec.input.model_dump(),
                           "prepare_seconds": round(distiller.prepare_seconds, 3), "stages": []}
    for i, name in enumerate(distiller.stages):
        distiller.enter_stage(i)
        r = distiller.report
        out["stages"].append({
            "stage": name, "train": r.train, "transform": r.transform, "batch_inputs": r.batch_inputs,
            "taps": [{"tap": t.tap, "node": t.node, "shape": fmt_shape(t.shape), "dtype": t.dtype,
                      "used_by": t.used_by} for t in r.taps],
            "adapters": [{"name": a.name, "type": a.type, "args": a.args, "inputs": a.inputs,
                          "parameters": a.parameters, "trainable": a.trainable, "side": a.side,
                          "output_shape": fmt_shape(a.output_shape)} for a in r.adapters],
            "losses": [{"name": lo.name, "type": lo.type, "weight": lo.weight, "inputs": lo.inputs} for lo in r.losses],
            "trainable_parameters": r.trainable_parameters,
            "teacher_nodes": r.teacher_nodes, "teacher_nodes_pruned": r.teacher_nodes_pruned,
            "pruned": [p["tap"] or p["name"] for p in r.pruned_nodes],
            "inplace_fixed": r.inplace_fixed, "graph_nodes": len(distiller.graph_module.graph.nodes),
        })
    distiller.enter_stage(0)
    return out


def _print_compile(summary: dict[str, Any]) -> None:
    from rich import box
    from rich.table import Table

    con = _console()
    inp = summary["input"]
    con.print(f"[bold]{summary['spec']}[/]: input {inp['channels']}x{inp['size'][0]}x{inp['size'][1]}, "
              f"{inp['num_classes']} classes, {len(summary['stages'])} stage(s); traced in {summary['prepare_seconds']} s")
    for s in summary["stages"]:
        con.print()
        con.rule(f"stage [bold cyan]{s['stage']}[/]  trains: {', '.join(s['train'])}"
                 + (f"  transform: {s['transform']}" if s["transform"] else "")
                 + (f"  batch inputs: {', '.join(s['batch_inputs'])}" if s["batch_inputs"] else ""), align="left")
        t = Table("tap", "shape", "dtype", "used by", box=box.SIMPLE, pad_edge=False, title="taps", title_justify="left")
        for tap in s["taps"]:
            t.add_row(f"[green]{tap['tap']}[/]", tap["shape"], tap["dtype"] or "", ", ".join(tap["used_by"]))
        con.print(t)
        if s["adapters"]:
            t = Table("adapter", "type", "args (inferred)", "params", "trains", "output", box=box.SIMPLE,
                      pad_edge=False, title="adapters", title_justify="left")
            for a in s["adapters"]:
                args = ", ".join(f"{k}={v}" for k, v in a["args"].items())
                t.add_row(f"[magenta]{a['name']}[/]", a["type"], args, _fmt_count(a["parameters"]),
                          "[green]yes[/]" if a["trainable"] else "[dim]frozen[/]", a["output_shape"])
            con.print(t)
        t = Table("loss", "type", "weight", "inputs", box=box.SIMPLE, pad_edge=False, title="loss terms",
                  title_justify="left")
        for lo in s["losses"]:
            t.add_row(f"[yellow]{lo['name']}[/]", lo["type"], f"{lo['weight']:g}",
                      ", ".join(f"{k}={v}" for k, v in lo["inputs"].items()))
        con.print(t)
        con.print(f"trainable parameters: [bold]{_fmt_count(s['trainable_parameters'])}[/]   "
                  f"teacher nodes pruned: [bold]{s['teacher_nodes_pruned']}[/] of {s['teacher_nodes']}"
                  + (f" ({', '.join(s['pruned'][:8])}{', ...' if len(s['pruned']) > 8 else ''})" if s["pruned"] else "")
                  + f"   fused graph: {s['graph_nodes']} nodes")
        for fix in s["inplace_fixed"]:
            con.print(f"[dim]in-place safety: {fix}[/]")


@main.command("compile")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--emit-code", "emit_code", type=click.Path(file_okay=False), default=None,
              help="write each stage's generated forward() as DIR/<spec>_<stage>.py")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.option("--input-size", nargs=2, type=int, default=None, metavar="H W", help="override the spec's input size")
@consent_options
def compile_cmd(spec: str, emit_code: Optional[str], as_json: bool, input_size) -> None:
    """Validate SPEC, trace both networks and build the fused graph of every stage (offline)."""
    from . import load_spec
    from .distiller import Distiller

    s = _override_input(load_spec(spec), input_size)
    distiller = Distiller.from_spec(s)
    summary = compile_summary(distiller)
    if emit_code:
        out = Path(emit_code)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for i, name in enumerate(distiller.stages):
            gm, _ = distiller.build_stage(i)
            path = out / f"{distiller.spec.name}_{name}.py"
            path.write_text(f"# kdgraph: generated forward() of spec {distiller.spec.name!r}, stage {name!r}\n"
                            f"# self.teacher / self.student / self.adapters / self.losses are the distiller's modules\n"
                            + gm.code)
            written.append(str(path))
        summary["emitted"] = written
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    _print_compile(summary)
    for p in summary.get("emitted", []):
        click.echo(f"wrote {p}")


# ------------------------------------------------------------------------------ inspect
def inspect_rows(net) -> list[dict[str, Any]]:
    rows = []
    for name, node, kind in net.entries():
        meta = node.meta.get("tensor_meta")
        rows.append({"name": name, "kind": kind, "shape": fmt_shape(net.shape(node)),
                     "dtype": str(meta.dtype).replace("torch.", "") if hasattr(meta, "dtype") else None,
                     "op": node.op, "target": str(node.target) if node.op != "call_module" else
                     type(net.module.get_submodule(node.target)).__name__})
    return rows


@main.command("inspect")
@click.argument("target")
@click.option("--network", type=click.Choice(["teacher", "student", "both"]), default="both",
              help="which network of a spec to list")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--input-size", nargs=2, type=int, default=None, metavar="H W", help="override the input size")
@click.option("--channels", type=int, default=None, help="input channels (for a model reference)")
@click.option("--grep", "pattern", default=None, help="only names containing this text")
@consent_options
def inspect_cmd(target: str, network: str, as_json: bool, input_size, channels, pattern) -> None:
    """List every tappable name of the networks in TARGET (a spec, or a model like torchvision:resnet18).

    Names are what a tap writes after 'teacher:' / 'student:'; shapes are for the spec's input size.
    """
    import torch

    from . import load_spec
    from .distiller import _device_of
    from .models import build_model
    from .spec import ModelRef
    from .trace import propagate_shapes, trace_network

    is_spec = target.endswith((".yaml", ".yml")) or (os.path.exists(target) and not target.count(":"))
    if is_spec:
        spec = _override_input(load_spec(target), input_size)
        refs = {"teacher": spec.teacher, "student": spec.student}
        if network != "both":
            refs = {network: refs[network]}
        c, (h, w) = spec.input.channels, spec.input.size
    else:
        refs = {"model": ModelRef(model=target)} if ":" in target else None
        if refs is None:
            raise KDGraphError(f"{target!r} is neither a spec file nor a model reference like torchvision:resnet18")
        c = channels or 3
        h, w = input_size or (224, 224)
    result: dict[str, list] = {}
    for role, ref in refs.items():
        module = build_model(ref, role)
        net = trace_network(module, role)
        propagate_shapes(net, torch.randn(2, c, h, w, device=_device_of(module)))
        rows = inspect_rows(net)
        if pattern:
            rows = [r for r in rows if pattern in r["name"]]
        result[role] = rows
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from rich import box
    from rich.table import Table

    con = _console()
    for role, rows in result.items():
        title = f"{role} ({refs[role].model}), input [B, {c}, {h}, {w}]: {len(rows)} tappable names"
        t = Table("tap name", "kind", "shape", "op", box=box.SIMPLE, pad_edge=False, title=title, title_justify="left")
        for r in rows:
            style = {"module": "green", "op": "cyan"}.get(r["kind"], "bold")
            t.add_row(f"[{style}]{r['name']}[/]", r["kind"], r["shape"], r["target"])
        con.print(t)
    con.print("[dim]a tap is 'teacher:<name>' or 'student:<name>'; '<module>@input' taps a module's input; "
              "grammar: README 'Taps'[/]")


def _register_optional_commands() -> None:
    """Commands that live beside their subsystems (train, viz), registered if present."""
    import importlib

    for module, names in (("kdgraph.train.cli", ("train_cmd", "eval_cmd", "export_cmd")),
                          ("kdgraph.viz_cli", ("viz_cmd",)), ("kdgraph.bench.cli", ("bench_cmd",))):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("kdgraph"):
                continue
            raise
        for n in names:
            cmd = getattr(mod, n, None)
            if cmd is not None:
                main.add_command(cmd, n.removesuffix("_cmd"))


_register_optional_commands()
