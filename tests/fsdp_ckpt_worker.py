"""Worker of tests/test_fsdp.py's checkpoint tests (the out-of-order pair of fsdp_worker, SGD with momentum).

``torchrun --nproc_per_node=2 fsdp_ckpt_worker.py OUT``: run A trains 4 steps uninterrupted; run B trains 2 steps,
saves a sharded checkpoint (OUT/ck), and a fresh sharded distiller + optimizer loads it and trains steps 3-4.
``python fsdp_ckpt_worker.py OUT`` (one process, no process group): loads OUT/ck (written by 2) into a plain
distiller, trains steps 3-4 (run C); run D loads OUT/ck, trains step 3, saves OUT/ck1, a fresh distiller loads it and
trains step 4. Results (full student parameters per step) go to OUT/ckpt_two.pt / OUT/ckpt_one.pt.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import kdgraph
from kdgraph.train import sharded_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_worker import BATCH, PAIRS, full  # noqa: E402


def fresh(sharded: bool):
    build, sp = PAIRS["shuffled"]
    torch.manual_seed(0)
    teacher, student = build()
    d = kdgraph.compile(sp, teacher=teacher, student=student)
    if sharded:
        from kdgraph.train import fsdp

        fsdp.shard(d)
    return d, torch.optim.SGD(d.trainable_parameters(), lr=0.1, momentum=0.9)


def steps(d, opt, first: int, last: int, sharded: bool) -> list[dict]:
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    out = []
    for step in range(first, last + 1):
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
        d(x[rows], y[rows]).loss.backward()
        opt.step()
        opt.zero_grad()
        out.append({k: full(v) for k, v in d.student.state_dict().items()})
    return out


def main(out: str) -> None:
    out_dir = Path(out)
    sharded = "WORLD_SIZE" in os.environ
    res = {}
    if sharded:
        dist.init_process_group("gloo")
        d, opt = fresh(True)
        res["A"] = steps(d, opt, 1, 4, True)
        d, opt = fresh(True)
        res["B_before"] = steps(d, opt, 1, 2, True)
        sharded_checkpoint.save(out_dir / "ck", d, opt, extra={"step": 2})
        d, opt = fresh(True)
        res["B_extra"] = sharded_checkpoint.load(out_dir / "ck", d, opt)
        res["B"] = steps(d, opt, 3, 4, True)
    else:
        d, opt = fresh(False)
        sharded_checkpoint.load(out_dir / "ck", d, opt)
        res["loaded"] = {k: v.detach().clone() for k, v in d.student.state_dict().items()}
        res["C"] = steps(d, opt, 3, 4, False)
        d, opt = fresh(False)
        sharded_checkpoint.load(out_dir / "ck", d, opt)
        first = steps(d, opt, 3, 3, False)
        sharded_checkpoint.save(out_dir / "ck1", d, opt, extra={"step": 3})
        d, opt = fresh(False)
        sharded_checkpoint.load(out_dir / "ck1", d, opt)
        res["D"] = first + steps(d, opt, 4, 4, False)
    if not sharded or dist.get_rank() == 0:
        torch.save(res, out_dir / ("ckpt_two.pt" if sharded else "ckpt_one.pt"))
    if sharded:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
