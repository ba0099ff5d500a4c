"""``kdgraph inspect TARGET``: every tappable name of a spec's networks (or of one model reference) with its
shape, as a table or ``--json``."""
from __future__ import annotations

import json
import os
from typing import Any

import click

from .. import formatting
from ..errors import KDGraphError
from ..models.trust import consent_options
from .compile import override_input_size
from .console import console

__all__ = ["inspect_cmd", "inspect_rows"]

TRACE_BATCH = 2  # the batch the networks are traced at (shapes print it as B)


def inspect_rows(net) -> list[dict[str, Any]]:
    """One row per tappable name of a traced network: name, kind, shape, dtype, op, target."""
    rows = []
    for name, node, kind in net.entries():
        meta = node.meta.get("tensor_meta")
        rows.append({"name": name, "kind": kind, "shape": formatting.shape(net.shape(node), TRACE_BATCH),
                     "dtype": formatting.dtype(meta.dtype) if hasattr(meta, "dtype") else None,
                     "op": node.op, "target": str(node.target) if node.op != "call_module" else
                     type(net.module.get_submodule(node.target)).__name__})
    return rows


def _print_rows(result: dict[str, list], refs: dict, input_shape: tuple[int, int, int, int] | str) -> None:
    from rich import box
    from rich.table import Table

    con = console()
    for role, rows in result.items():
        shown = formatting.shape(input_shape, TRACE_BATCH) if isinstance(input_shape, tuple) else input_shape
        title = (f"{role} ({refs[role].model}), input {shown}: "
                 f"{len(rows)} tappable names")
        t = Table("tap name", "kind", "shape", "op", box=box.SIMPLE, pad_edge=False, title=title, title_justify="left")
        for r in rows:
            style = {"module": "green", "op": "cyan"}.get(r["kind"], "bold")
            t.add_row(f"[{style}]{r['name']}[/]", r["kind"], r["shape"], r["target"])
        con.print(t)
    con.print("[dim]a tap is 'teacher:<name>' or 'student:<name>'; '<module>@input' taps a module's input; "
              "grammar: README 'Taps'[/]")


@click.command("inspect")
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

    from .. import load_spec
    from ..capture import capture, capture_for_spec, device_of, example_input
    from ..models import build_model
    from ..spec import ModelRef

    is_spec = target.endswith((".yaml", ".yml")) or (os.path.exists(target) and not target.count(":"))
    if is_spec:
        spec = override_input_size(load_spec(target), input_size)
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
        example = (example_input(spec, module, TRACE_BATCH) if is_spec
                   else torch.randn(TRACE_BATCH, c, h, w, device=device_of(module)))
        # a spec's networks are captured exactly as compile captures them (its leaf_modules honoured)
        net = capture_for_spec(spec, role, module, example) if is_spec else capture(module, role, example=example)
        rows = inspect_rows(net)
        if pattern:
            rows = [r for r in rows if pattern in r["name"]]
        result[role] = rows
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    named = spec.input.named if is_spec else {}
    _print_rows(result, refs, ", ".join(f"{k} B×{'×'.join(map(str, v.shape))}" for k, v in named.items())
                if named else (TRACE_BATCH, c, h, w))
