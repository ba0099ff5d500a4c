"""``kdgraph viz SPEC -o FILE``: draw a spec's fused graph (:func:`kdgraph.viz.render`) and say what was drawn."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ..errors import KDGraphError
from ..models.trust import consent_options

__all__ = ["viz_cmd"]


@click.command("viz")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="file to write: .svg or .png (need Graphviz), .dot or .html (self-contained, no Graphviz)")
@click.option("--stage", default="all", show_default=True, help="a stage name or index, or 'all'")
@click.option("--depth", type=click.IntRange(min=0), default=1, show_default=True,
              help="0: one box per network, 1: top-level modules (layer1..layer4), 2: blocks, 3+: layers")
@click.option("--format", "fmt", type=click.Choice(["svg", "png", "dot", "html"]), default=None,
              help="output format (default: from the file's suffix)")
@click.option("--input-size", nargs=2, type=int, default=None, metavar="H W",
              help="override the spec's input size (shapes shown are for this size)")
@click.option("--dpi", type=click.IntRange(min=30, max=600), default=96, show_default=True, help="PNG resolution")
@consent_options
def viz_cmd(spec: str, output: str, stage: str, depth: int, fmt: Optional[str], input_size, dpi: int) -> None:
    """Draw every stage (or one) of SPEC's fused graph: teacher and student clusters, taps on the edges
    they read, adapters, losses; frozen parts dashed, pruned teacher nodes faded.

    \b
    kdgraph viz specs/kr_resnet18.yaml -o kr.svg
    kdgraph viz specs/ft_resnet18.yaml -o ft.html --stage main --depth 2
    """
    from .. import load_spec
    from ..distiller import Distiller
    from ..viz import FORMATS, Kind, dot_binary, render
    from .compile import override_input_size

    out = Path(output)
    kind = (fmt or out.suffix.lstrip(".")).lower()
    if kind not in FORMATS:
        raise KDGraphError(f"-o {output}: cannot tell the format from {out.suffix or 'no suffix'!r}; end the file "
                           f"name in {', '.join('.' + f for f in FORMATS)} or pass --format")
    if kind in ("svg", "png"):
        dot_binary()  # fail before compiling if Graphviz is missing
    s = override_input_size(load_spec(spec), input_size)
    if stage != "all" and not stage.lstrip("-").isdigit():
        s.stage(stage)  # unknown stage names fail before tracing
    distiller = Distiller.from_spec(s)
    drawn = render(distiller, out, stage=stage, depth=depth, fmt=kind, dpi=dpi)
    for v in drawn:
        taps = sum(len(e.taps) for e in v.edges)
        adapters = sum(1 for n in v.nodes.values() if n.kind == Kind.ADAPTER)
        losses = sum(1 for n in v.nodes.values() if n.kind == Kind.LOSS)
        pruned = sum(1 for n in v.nodes.values() if n.pruned)
        click.echo(f"stage {v.stage}: {len(v.nodes)} boxes, {taps} taps, {adapters} adapters, {losses} loss terms"
                   + (f", {pruned} pruned" if pruned else ""))
    click.echo(f"wrote {out}")
