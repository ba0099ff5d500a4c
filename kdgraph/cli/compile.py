"""``kdgraph compile SPEC``: validate, trace and fuse every stage; print the summary (taps, adapters, losses,
pruning) as tables or ``--json``, optionally write each stage's generated ``forward()``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click

from .. import formatting
from ..models.trust import consent_options
from .console import console

__all__ = ["compile_cmd", "compile_summary", "print_compile", "override_input_size"]


def override_input_size(spec, input_size: Optional[tuple[int, int]]):
    """``--input-size H W``: the spec with its input size replaced (shapes are traced at that size), validated
    as the spec's own ``input.size`` is (the same bounds, the same error)."""
    if input_size:
        from ..spec.overrides import apply_overrides

        h, w = input_size
        return apply_overrides(spec, [f"input.size=[{int(h)}, {int(w)}]"])
    return spec


def compile_summary(distiller) -> dict[str, Any]:
    """The compile summary as plain data (what ``--json`` prints). Shapes read as in ``kdgraph viz``."""
    from ..distiller.graphview import to_networkx
    from ..spec import describe_recipe
    from ..viz.shapes import ShapeText

    out: dict[str, Any] = {"spec": distiller.spec.name, "input": distiller.spec.input.model_dump(),
                           "prepare_seconds": round(distiller.prepare_seconds, 3),
                           "capture": {role: {"backend": net.backend, "fx_error": net.fx_error}
                                       for role, net in distiller.traced.items()},
                           "stages": [],
                           "data": {"drop_last": distiller.spec.data.drop_last,
                                    "augment": (distiller.spec.data.augment.model_dump(mode="json")
                                                if distiller.spec.data.augment is not None else None)}}
    for i, name in enumerate(distiller.stages):
        distiller.enter_stage(i)
        r = distiller.report
        shapes = ShapeText(to_networkx(distiller))
        out["stages"].append({
            "stage": name, "train": r.train, "transform": r.transform, "batch_inputs": r.batch_inputs,
            "optional_batch_inputs": r.optional_batch_inputs,
            "recipe": describe_recipe(distiller.spec.stages[i]),
            "cached_taps": r.cached_taps,
            "taps": [{"tap": t.tap, "node": t.node, "shape": shapes.of_tap(t.tap, t.shape), "dtype": t.dtype,
                      "used_by": t.used_by} for t in r.taps],
            "adapters": [{"name": a.name, "type": a.type, "args": a.args, "inputs": a.inputs,
                          "parameters": a.parameters, "trainable": a.trainable, "side": a.side,
                          "output_shape": shapes.of_adapter(a.name, a.output_shape)} for a in r.adapters],
            "losses": [{"name": lo.name, "type": lo.type, "weight": lo.weight.model_dump(by_alias=True) if hasattr(lo.weight, "model_dump") else lo.weight, "inputs": lo.inputs} for lo in r.losses],
            "trainable_parameters": r.trainable_parameters,
            "teacher_nodes": r.teacher_nodes, "teacher_nodes_pruned": r.teacher_nodes_pruned,
            "pruned": [p["tap"] or p["name"] for p in r.pruned_nodes],
            "inplace_fixed": r.inplace_fixed, "graph_nodes": len(distiller.graph_module.graph.nodes),
            "passes": [p.to_dict() for p in r.passes],
        })
    distiller.enter_stage(0)
    return out


def print_compile(summary: dict[str, Any]) -> None:
    """The summary as tables: one rule per stage, then its taps, adapters and loss terms."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    con = console()
    inp = summary["input"]
    shown = (", ".join(f"{k} {'x'.join(map(str, v['shape']))} {v['dtype']}" for k, v in inp["named"].items())
             if inp.get("named") else f"{inp['channels']}x{inp['size'][0]}x{inp['size'][1]}")
    con.print(f"[bold]{escape(summary['spec'])}[/]: input {escape(shown)}, {inp['num_classes']} classes, "
              f"{len(summary['stages'])} stage(s); captured in {summary['prepare_seconds']} s")
    data = summary.get("data") or {}
    if data.get("augment") is not None or data.get("drop_last") is False:
        from ..spec.augment import AugmentSpec

        aug = AugmentSpec(**data["augment"]).describe() if data.get("augment") else "default augmentation"
        con.print(f"training data: {escape(aug)}; last partial batch "
                  f"{'dropped' if data.get('drop_last', True) else 'kept'}", soft_wrap=True)
    for role, c in summary["capture"].items():
        why = f" (torch.fx could not: {c['fx_error']})" if c["fx_error"] else ""
        con.print(f"{role} captured with [bold]{c['backend']}[/]{escape(why)}", soft_wrap=True)
    for s in summary["stages"]:
        con.print()
        con.rule(f"stage [bold cyan]{s['stage']}[/]  trains: {', '.join(s['train'])}"
                 + (f"  transform: {s['transform']}" if s["transform"] else "")
                 + (f"  batch inputs: {', '.join(s['batch_inputs'])}" if s["batch_inputs"] else "")
                 + (f"  optional: {', '.join(s['optional_batch_inputs'])}" if s["optional_batch_inputs"] else "")
                 + (f"  from the teacher cache: {', '.join(s['cached_taps'])}" if s["cached_taps"] else ""),
                 align="left")
        if s.get("recipe"):
            con.print(f"recipe: {escape(s['recipe'])}", soft_wrap=True)
        t = Table("tap", "shape", "dtype", "used by", box=box.SIMPLE, pad_edge=False, title="taps", title_justify="left")
        for tap in s["taps"]:
            t.add_row(f"[green]{tap['tap']}[/]", tap["shape"], tap["dtype"] or "", ", ".join(tap["used_by"]))
        con.print(t)
        if s["adapters"]:
            t = Table("adapter", "type", "args (inferred)", "params", "trains", "output", box=box.SIMPLE,
                      pad_edge=False, title="adapters", title_justify="left")
            for a in s["adapters"]:
                args = ", ".join(f"{k}={v}" for k, v in a["args"].items())
                t.add_row(f"[magenta]{a['name']}[/]", a["type"], args, formatting.count_exact(a["parameters"]),
                          "[green]yes[/]" if a["trainable"] else "[dim]frozen[/]", a["output_shape"])
            con.print(t)
        t = Table("loss", "type", "weight", "inputs", box=box.SIMPLE, pad_edge=False, title="loss terms",
                  title_justify="left")
        for lo in s["losses"]:
            t.add_row(f"[yellow]{lo['name']}[/]", lo["type"], _weight_text(lo["weight"]),
                      ", ".join(f"{k}={v}" for k, v in lo["inputs"].items()))
        con.print(t)
        pruned = s["pruned"]
        con.print(f"trainable parameters: [bold]{formatting.count_exact(s['trainable_parameters'])}[/]   "
                  f"teacher nodes pruned: [bold]{s['teacher_nodes_pruned']}[/] of {s['teacher_nodes']}"
                  + (f" ({', '.join(pruned[:8])}{', ...' if len(pruned) > 8 else ''})" if pruned else "")
                  + f"   fused graph: {s['graph_nodes']} nodes")
        for fix in s["inplace_fixed"]:
            con.print(f"[dim]in-place safety: {fix}[/]")
        if s["passes"]:
            con.print("passes: " + "; ".join(f"[bold]{p['name']}[/] {p['summary']}" if p["changed"]
                                             else f"[dim]{p['name']}: {p['summary']}[/]" for p in s["passes"]))


def _emit_code(distiller, folder: str) -> list[str]:
    """Write each stage's generated ``forward()`` as ``folder/<spec>_<stage>.py``; the paths written."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, name in enumerate(distiller.stages):
        gm, _ = distiller.build_stage(i)
        path = out / f"{distiller.spec.name}_{name}.py"
        path.write_text(f"# kdgraph: generated forward() of spec {distiller.spec.name!r}, stage {name!r}\n"
                        f"# self.teacher / self.student / self.adapters / self.losses are the distiller's modules\n"
                        + gm.code)
        written.append(str(path))
    return written


@click.command("compile")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--emit-code", "emit_code", type=click.Path(file_okay=False), default=None,
              help="write each stage's generated forward() as DIR/<spec>_<stage>.py")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.option("--input-size", nargs=2, type=int, default=None, metavar="H W", help="override the spec's input size")
@consent_options
def compile_cmd(spec: str, emit_code: Optional[str], as_json: bool, input_size) -> None:
    """Validate SPEC, trace both networks and build the fused graph of every stage (offline)."""
    from .. import load_spec
    from ..distiller import Distiller

    distiller = Distiller.from_spec(override_input_size(load_spec(spec), input_size))
    summary = compile_summary(distiller)
    if emit_code:
        summary["emitted"] = _emit_code(distiller, emit_code)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    print_compile(summary)
    for p in summary.get("emitted", []):
        click.echo(f"wrote {p}")


def _weight_text(weight) -> str:
    """A number, or a schedule's description (``linear_warmup 0 -> 1 over epochs 0..1 (per step)``)."""
    from ..spec.schedule import Schedule

    return Schedule.model_validate(weight).describe() if isinstance(weight, dict) else f"{weight:g}"
