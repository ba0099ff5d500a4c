"""kdgraph in PyTorch Lightning: a LightningModule around the distiller, one ``fit`` per stage, DDP, checkpoints.

    pip install 'kdgraph[lightning]'
    python examples/lightning_loop.py [--spec specs/ft_resnet18.yaml] [--size 32] [--steps 2] [--batch 4]
                                      [--devices 2] [--out runs/lightning]

Lightning calls ``.train()`` on the module at every fit; the distiller's ``train()`` keeps the
teacher (and any adapter the stage does not train) in eval mode whatever the mode. Each stage is its
own ``Trainer.fit``: ``configure_optimizers`` hands the optimizer only ``trainable_parameters()``
of the stage just entered, and DDP wraps the module afresh (it registers what requires grad when it
wraps). The current stage travels in the checkpoint (``on_save_checkpoint``), the distiller's whole
state (teacher, student, adapters, loss buffers such as CRD's memory) in ``state_dict``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

import kdgraph

ROOT = Path(__file__).resolve().parents[1]


class RandomImages(Dataset):
    """Stands in for your dataset: map-style, ``(image, target)`` items."""

    def __init__(self, n: int, channels: int, size: int, num_classes: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, channels, size, size, generator=g)
        self.targets = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], int(self.targets[i])


class DistillModule(L.LightningModule):
    """The distiller as a LightningModule: ``training_step`` is one call, the optimizer sees only what trains."""

    def __init__(self, spec_path: str, size: int, lr: float = 0.01):
        super().__init__()
        self.save_hyperparameters()
        self.spec = kdgraph.load_spec(spec_path, overrides=[f"input.size=[{size}, {size}]"])
        self.distiller = kdgraph.compile(self.spec)
        self.teacher_was_training: list[bool] = []

    def training_step(self, batch, batch_idx):
        # Lightning has just called self.train(): the teacher is still in eval mode
        self.teacher_was_training.append(any(m.training for m in self.distiller.teacher.modules()))
        out = self.distiller(**kdgraph.data.batch_kwargs(batch))
        self.log("loss", out.loss.detach(), prog_bar=False)
        return out.loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.distiller.trainable_parameters(), lr=self.hparams.lr, momentum=0.9)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["kdgraph_stage"] = self.distiller.stage

    def on_load_checkpoint(self, checkpoint):
        self.distiller.enter_stage(checkpoint["kdgraph_stage"])


def trainer(args, stage: str) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                     max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(Path(args.out) / stage))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "specs" / "ft_resnet18.yaml"))
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per stage")
    ap.add_argument("--batch", type=int, default=4, help="per process")
    ap.add_argument("--devices", type=int, default=2, help="CPU processes (DDP, gloo)")
    ap.add_argument("--out", default="runs/lightning")
    args = ap.parse_args()

    L.seed_everything(0, verbose=False)
    module = DistillModule(args.spec, args.size)
    d = module.distiller
    teacher0 = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    student0 = {k: v.clone() for k, v in d.student.state_dict().items()}
    spec = module.spec
    data = RandomImages(16 * args.devices, spec.input.channels, args.size, spec.input.num_classes)
    for stage in d.stages:
        d.enter_stage(stage)
        loader = DataLoader(kdgraph.data.wrap(data, spec, stage=stage), batch_size=args.batch, shuffle=True,
                            drop_last=True)
        fit = trainer(args, stage)
        fit.fit(module, loader)          # Lightning adds the DistributedSampler and wraps the module in DDP
    ckpt = Path(args.out) / "last.ckpt"
    fit.save_checkpoint(ckpt)            # every rank calls it; rank 0 writes
    if fit.global_rank != 0:
        return
    restored = DistillModule.load_from_checkpoint(ckpt, map_location="cpu")
    same = all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), restored.state_dict().values()))
    result = {
        "stages": d.stages,
        "world_size": fit.world_size,
        "strategy": type(fit.strategy).__name__,
        "steps_last_stage": fit.global_step,
        "teacher_unchanged": all(torch.equal(teacher0[k], v) for k, v in d.teacher.state_dict().items()),
        "teacher_eval_in_every_step": not any(module.teacher_was_training) and len(module.teacher_was_training) > 0,
        "student_changed": any(not torch.equal(student0[k], v) for k, v in d.student.state_dict().items()
                               if v.is_floating_point()),
        "restored_stage": restored.distiller.stage,
        "restored_equal": same and list(module.state_dict()) == list(restored.state_dict()),
        "checkpoint": str(ckpt),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
