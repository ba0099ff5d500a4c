"""Drawing the fused graph: Graphviz SVG / PNG, DOT text, and a self-contained interactive HTML page.

    d = kdgraph.compile("specs/kr_resnet18.yaml")
    kdgraph.viz.render(d, "kr.svg")                    # every stage; .png, .dot, .html alike
    kdgraph.viz.render(d, "kr_main.html", stage="main", depth=2)

or ``kdgraph viz specs/kr_resnet18.yaml -o kr.svg [--stage NAME|all] [--depth N]``.

What is drawn (per stage, from :func:`kdgraph.distiller.graphview.to_networkx`):

* the teacher and the student as two clusters, their nodes collapsed to module level: ``depth=1``
  shows ``conv1 .. layer1 .. layer4, avgpool, fc``, ``depth=2`` the blocks (``layer1.0``), ``depth=3``
  every layer; ``depth=0`` one box per network. A box lists its module type, output shape
  (``B`` = the batch) and parameter count;
* the taps on the edges that read them, with their shapes;
* adapters (orange) and loss terms (red) with their weights, the total loss;
* what the stage trains (solid, bold borders) versus what is frozen (dashed borders, "frozen");
* the teacher nodes dead-code elimination removed, faded (grey, dashed).

SVG and PNG are laid out by Graphviz's ``dot`` program (Debian/Ubuntu: ``apt-get install graphviz``;
macOS: ``brew install graphviz``). ``.dot`` and ``.html`` need no Graphviz: the HTML page carries its
own layered layout and a small inline script (no network access).

The package, one job a module: :mod:`.model` (the view model: boxes, edges, a stage's view),
:mod:`.build` (the view from the networkx graph), :mod:`.shapes` (shape text, as the CLI prints it),
:mod:`.style` (colours), :mod:`.dot` (DOT, running Graphviz), :mod:`.layout` and :mod:`.webpage`
(the HTML page; its HTML/CSS/JS are the files under ``page/``), :mod:`.draw` (:func:`render`).
"""
from .build import stage_view, views
from .dot import GraphvizMissing, dot_binary, run_dot, to_dot
from .draw import FORMATS, render
from .layout import layout
from .model import DEdge, Kind, StageView, VEdge, VNode
from .shapes import ShapeText
from .style import CLUSTER_FILL, COLOURS, PRUNED, TAP
from .webpage import to_html

__all__ = ["render", "to_dot", "to_html", "run_dot", "views", "stage_view", "layout", "dot_binary", "FORMATS",
           "GraphvizMissing", "StageView", "VNode", "VEdge", "DEdge", "Kind", "ShapeText", "COLOURS", "PRUNED",
           "TAP", "CLUSTER_FILL"]
