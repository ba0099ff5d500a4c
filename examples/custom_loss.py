"""Add your own loss (and adapter) from user code, then name it in a spec like a built-in one.

    python examples/custom_loss.py [--steps 8] [--batch 16]

``@kdgraph.register_loss("cosine_embedding")`` makes ``type: cosine_embedding`` valid in any spec
loaded afterwards; ``@kdgraph.register_adapter("linear_connector")`` does the same for an adapter.
The compiler knows neither by name: it binds each ``inputs`` entry to a tap, asks the adapter for
the arguments the spec leaves out (``infer_args``, from the traced shapes) and asks the loss whether
the shapes fit (``check_shapes``) before anything runs. See docs/extending.md.
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

import kdgraph
from kdgraph.errors import ShapeError


def _features(shape) -> int:
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n


@kdgraph.register_loss("cosine_embedding")
class CosineEmbedding(kdgraph.DistillLoss):
    """``1 - cos(s, t)`` between flattened student and teacher embeddings, averaged over the batch."""

    inputs = ("student", "teacher")  # the names the spec's `inputs:` binds to taps

    @classmethod
    def check_shapes(cls, shapes: Mapping[str, Any], taps: Mapping[str, str], where: str) -> None:
        s, t = shapes.get("student"), shapes.get("teacher")
        if s is not None and t is not None and _features(s) != _features(t):
            raise ShapeError(f"{where}: cosine_embedding compares {taps['student']} ({_features(s)} features, "
                             f"shape {list(s)}) with {taps['teacher']} ({_features(t)} features, shape {list(t)}); "
                             f"put a linear_connector adapter on the student side")

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        cos = F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1, eps=self.eps)
        return (1.0 - cos).mean()


@kdgraph.register_adapter("linear_connector")
class LinearConnector(kdgraph.Adapter):
    """``Linear(in_features, out_features)`` on a flattened tap; both sizes follow from the shapes."""

    inputs = ("x",)

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)

    @classmethod
    def infer_args(cls, args: dict[str, Any], input_shapes: Mapping[str, Any], match_shape) -> dict[str, Any]:
        args = dict(args)
        args.setdefault("in_features", _features(input_shapes["x"]))
        if match_shape is not None:
            args.setdefault("out_features", _features(match_shape))
        return args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


SPEC = """
name: custom_loss_demo
description: CE + a user-registered cosine loss between a connected student embedding and the teacher's
input: {channels: 3, size: [32, 32], num_classes: 10}
teacher: {model: "kdgraph.zoo:tiny_cnn", kwargs: {in_channels: 3, width: 32}}
student: {model: "kdgraph.zoo:tiny_cnn", kwargs: {in_channels: 3, width: 8}}
adapters:
  connector: {type: linear_connector, inputs: {x: "student:avgpool"}, match: "teacher:/flatten"}
stages:
  - name: main
    optimizer: {type: sgd, lr: 0.05, momentum: 0.9}
    train: [student, connector]
    losses:
      - {name: ce, type: cross_entropy, weight: 1.0}
      - {name: cosine, type: cosine_embedding, weight: 2.0,
         inputs: {student: "adapter:connector", teacher: "teacher:/flatten"}}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    torch.manual_seed(0)
    distiller = kdgraph.compile(SPEC)  # a YAML string, a path, a dict or a Spec
    connector = distiller.adapters["connector"]
    print(f"connector: {connector.fc.in_features} -> {connector.fc.out_features} features (inferred)")
    print("loss modules:", {k: type(v).__name__ for k, v in distiller.losses["main"].items()})

    # a shape mismatch is caught at compile time, naming both taps
    bad = SPEC.replace('student: "adapter:connector"', 'student: "student:avgpool"')
    try:
        kdgraph.compile(bad)
    except kdgraph.ShapeError as e:
        print("compile-time check:", str(e).split(";")[0])

    opt = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05, momentum=0.9)
    distiller.train()
    images, targets = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    first = last = None
    for step in range(args.steps):
        out = distiller(images, targets)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        first = out.terms["cosine"].item() if first is None else first
        last = out.terms["cosine"].item()
        print(f"step {step}: loss={out.loss.item():.4f}  ce={out.terms['ce'].item():.4f}  "
              f"cosine={out.terms['cosine'].item():.4f}")
    print(f"cosine term decreased: {last < first} ({first:.4f} -> {last:.4f})")
    print(f"connector trained: {connector.fc.weight.grad is not None}")


if __name__ == "__main__":
    main()
