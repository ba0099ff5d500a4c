"""kdgraph with Hugging Face accelerate: ``accelerator.prepare``, mixed precision (bf16 on CPU), gradient accumulation.

    pip install 'kdgraph[accelerate]'
    python examples/accelerate_loop.py [--spec specs/kd_resnet18.yaml] [--size 32] [--micro-steps 4]
                                       [--accumulate 2] [--batch 4] [--mixed-precision bf16]
    accelerate launch --num_processes 2 examples/accelerate_loop.py ...      # several processes: DDP

Per stage, the distiller and an optimizer over its ``trainable_parameters()`` (the student, the adapters
the stage trains, loss parameters; never the teacher) go through ``accelerator.prepare``: accelerate runs
the forward under autocast and, with several processes, wraps the module in DDP (which registers only
parameters that require grad, so the frozen teacher is not synchronised). ``accelerator.accumulate``
steps the optimizer every ``--accumulate`` micro-batches.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "specs" / "kd_resnet18.yaml"))
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--micro-steps", type=int, default=4, help="micro-batches per stage")
    ap.add_argument("--accumulate", type=int, default=2, help="gradient accumulation steps")
    ap.add_argument("--batch", type=int, default=4, help="per process")
    ap.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    args = ap.parse_args()

    accelerator = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.accumulate,
                              cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    spec = kdgraph.load_spec(args.spec, overrides=[f"input.size=[{args.size}, {args.size}]"])
    distiller = kdgraph.compile(spec)
    teacher0 = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    data = RandomImages(8 * args.batch, spec.input.channels, args.size, spec.input.num_classes)
    stats = {"micro_batches": 0, "optimizer_steps": 0, "teacher_was_training": False, "loss_dtypes": set(),
             "conv_dtypes": set()}
    # what the student's convolutions compute in (accelerate returns outputs converted to float32)
    first_conv = next(m for m in distiller.student.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda m, i, o: stats["conv_dtypes"].add(str(o.dtype)))
    for stage in distiller.stages:
        distiller.enter_stage(stage)
        params = distiller.trainable_parameters()
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        loader = DataLoader(kdgraph.data.wrap(data, spec, stage=stage), batch_size=args.batch, shuffle=True,
                            drop_last=True)
        model, opt, loader = accelerator.prepare(distiller, opt, loader)
        model.train()
        batches = iter(loader)
        for _ in range(args.micro_steps):
            batch = kdgraph.data.batch_kwargs(next(batches))
            with accelerator.accumulate(model):
                before = [p.detach().clone() for p in params]
                out = model(**batch)
                accelerator.backward(out.loss)
                opt.step()
                opt.zero_grad()
                moved = any(not torch.equal(b, p) for b, p in zip(before, params))
            stats["micro_batches"] += 1
            stats["optimizer_steps"] += int(moved)
            stats["loss_dtypes"].add(str(out.loss.dtype))
            stats["teacher_was_training"] |= any(m.training for m in distiller.teacher.modules())
            accelerator.print(f"stage {stage} micro-batch {stats['micro_batches']}: loss={out.loss.item():.4f}"
                              f" sync={accelerator.sync_gradients} stepped={moved}")
        # undo accelerate's forward patch before the next stage prepares the distiller again
        distiller = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        accelerator.free_memory()
    if accelerator.is_main_process:
        result = {
            "stages": distiller.stages,
            "mixed_precision": accelerator.mixed_precision,
            "accumulate": args.accumulate,
            "micro_batches": stats["micro_batches"],
            "optimizer_steps": stats["optimizer_steps"],
            "student_conv_dtypes": sorted(stats["conv_dtypes"]),
            "loss_dtypes": sorted(stats["loss_dtypes"]),
            "teacher_unchanged": all(torch.equal(teacher0[k], v) for k, v in distiller.teacher.state_dict().items()),
            "teacher_eval_in_every_step": not stats["teacher_was_training"],
            "teacher_in_optimizer": any(p.requires_grad for p in distiller.teacher.parameters()),
        }
        print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
