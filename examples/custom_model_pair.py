"""Distil between your own networks: a teacher/student pair defined right here, not from torchvision.

    python examples/custom_model_pair.py [--steps 8] [--batch 16] [--draw pair.html]

The pair is passed to ``kdgraph.compile(spec_dict, teacher=..., student=...)``; the spec (a plain
dict here, YAML works the same) taps them by module path: ``student:stage2`` is the output of the
student's ``stage2`` module, ``teacher:stage3/add`` the residual add inside the teacher's ``stage3``
block (``kdgraph inspect`` lists every name). The loss: cross-entropy + KD on the logits +
attention transfer on two stages (AT compares spatial maps, so the channel counts may differ).

Both networks are randomly initialised; with a trained teacher, load its weights first
(``teacher.load_state_dict(torch.load("teacher.pt"))``) - ``compile`` never touches weights.
"""
from __future__ import annotations

import argparse

import networkx as nx
import torch
from torch import nn
from torch.nn import functional as F

import kdgraph


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn + projection shortcut, ReLU after the add."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                                  nn.ReLU(), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class TeacherNet(nn.Module):
    """A small residual network: stem, three residual stages (32, 64, 128 channels), linear head."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.stage1 = ResidualBlock(widths[0], widths[0], 1)
        self.stage2 = ResidualBlock(widths[0], widths[1], 2)
        self.stage3 = ResidualBlock(widths[1], widths[2], 2)
        self.head = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class StudentNet(nn.Module):
    """A plain (no shortcut) CNN, a quarter of the teacher's width, same downsampling."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (8, 16, 32)):
        super().__init__()

        def stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        self.stage1 = stage(3, widths[0], 1)
        self.stage2 = stage(widths[0], widths[1], 2)
        self.stage3 = stage(widths[1], widths[2], 2)
        self.classifier = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


SPEC = {
    "name": "custom_pair",
    "description": "CE + KD + attention transfer between two user-defined CNNs",
    "input": {"channels": 3, "size": [32, 32], "num_classes": 10},
    # the references document where the models come from; given modules are used as they are
    "teacher": {"model": "__main__:TeacherNet"},
    "student": {"model": "__main__:StudentNet"},
    "stages": [{
        "name": "main",
        "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4},
        "train": ["student"],
        "losses": [
            {"name": "ce", "type": "cross_entropy", "weight": 0.5},
            {"name": "kd", "type": "kd", "weight": 0.5, "args": {"temperature": 4.0},
             "inputs": {"student": "student:@output", "teacher": "teacher:@output"}},
            {"name": "at_stage2", "type": "at", "weight": 100.0,
             "inputs": {"student": "student:stage2", "teacher": "teacher:stage2"}},
            {"name": "at_stage3", "type": "at", "weight": 100.0,
             "inputs": {"student": "student:stage3", "teacher": "teacher:stage3/add"}},
        ],
    }],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--draw", default=None, help="also draw the fused graph (.html or .dot need no Graphviz)")
    args = ap.parse_args()

    torch.manual_seed(0)
    teacher, student = TeacherNet(), StudentNet()
    distiller = kdgraph.compile(SPEC, teacher=teacher, student=student)
    assert distiller.student is student and distiller.teacher is teacher  # shared, not copied
    for t in distiller.report.taps:
        print(f"tap {t.tap:<22} -> node {t.node:<26} shape {list(t.shape) if t.shape else '?'}")

    # the fused graph is a networkx graph: how does the teacher's stage3 tap reach the total loss?
    G = distiller.graph
    path = nx.shortest_path(G, G.graph["taps"]["teacher:stage3/add"], G.graph["loss_node"])
    print("path teacher:stage3/add -> loss:", " -> ".join(path))
    pruned = [a["name"] for _, a in G.nodes(data=True) if a["pruned"]]
    print("teacher nodes pruned (no loss needs them):", ", ".join(pruned) or "none")

    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    distiller.train()  # the teacher stays in eval mode (frozen BN statistics)
    opt = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(args.batch, 3, 32, 32)  # one fixed batch: the loss must go down on it
    targets = torch.randint(0, 10, (args.batch,))
    losses = []
    for step in range(args.steps):
        out = distiller(images, targets)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        print(f"step {step}: loss={out.loss.item():.4f}  "
              + "  ".join(f"{k}={v.item():.4f}" for k, v in out.terms.items()))
    same = all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    moved = any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    print(f"teacher unchanged: {same}")
    print(f"student updated: {moved}")
    print(f"loss decreased: {losses[-1] < losses[0]} ({losses[0]:.4f} -> {losses[-1]:.4f})")
    if args.draw:
        from kdgraph import viz

        viz.render(distiller, args.draw)
        print(f"wrote {args.draw}")


if __name__ == "__main__":
    main()
