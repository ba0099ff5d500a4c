"""The teacher output cache's cost and gain (FKD: Shen & Xing, ECCV 2022), measured, not a test.

    OMP_NUM_THREADS=1 python benchmarks/teacher_cache.py [--images 2048] [--views 4] [--steps 12] [--json]

1. ``kdgraph train`` images/s on specs/fashion_mnist/kd.yaml (ResNet-34/16 -> ResNet-18/16, 28x28), one epoch
   over ``--images`` images, the online teacher vs the cache (the same steps); the teacher's weights are a random
   file (no pretraining), which changes nothing about speed.
2. The one-time cost of ``cache-teacher`` on those images (seconds, images/s including the R views).
3. One KD step (forward, backward, SGD) at batch 32, 112x112, torchvision ResNet-34 -> ResNet-18 (random
   weights): the online teacher vs a full-logit cache (the teacher's logits as a batch input), interleaved in one
   process, medians of ``--steps`` steps after 2 warm-up steps each.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kdgraph  # noqa: E402
from kdgraph.train import train  # noqa: E402
from kdgraph.train.teacher_cache import cache_teacher  # noqa: E402

QUIET = {"device": "cpu", "progress": False, "plot": False, "tensorboard": False}


def fashion_mnist(tmp: Path, images: int, views: int) -> dict:
    spec = kdgraph.load_spec(ROOT / "specs/fashion_mnist/kd.yaml")
    torch.manual_seed(0)
    teacher = kdgraph.models.build_model(spec.teacher, "teacher")
    torch.save(teacher.state_dict(), tmp / "teacher.pt")
    sets = [f"teacher.weights={tmp / 'teacher.pt'}", "teacher.pretrain=null", "stages.main.epochs=1",
            f"data.train_subset={images}", "data.val_subset=256", "runtime.eval_teacher=false"]
    online = kdgraph.load_spec(spec, overrides=sets)
    cached = kdgraph.load_spec(spec, overrides=sets + [f"runtime.teacher_cache={tmp / 'cache'}"])
    t0 = time.perf_counter()
    made = cache_teacher(cached, views, tmp / "cache", device="cpu", progress=False, say=lambda m: None)
    cache_s = time.perf_counter() - t0
    runs = {}
    for name, s in (("online", online), ("cache", cached)):
        res = train(s, out=tmp / name, **QUIET)
        runs[name] = {"train_images_per_s": res["stages"][0]["train_images_per_s"], "wall_s": res["wall_s"]}
    return {"images": images, "views": views, "cache_teacher_s": round(cache_s, 2),
            "cache_teacher_images_per_s": round(images / cache_s, 1),
            "cache_teacher_views_per_s": round(images * views / cache_s, 1), "teacher_only": made, **runs,
            "speedup": round(runs["cache"]["train_images_per_s"] / runs["online"]["train_images_per_s"], 2)}


def step_time(steps: int, batch: int = 32, size: int = 112) -> dict:
    base = kdgraph.load_spec(ROOT / "specs/kd_resnet18.yaml", overrides=["teacher.weights=null",
                                                                         f"input.size=[{size}, {size}]"])
    online = kdgraph.compile(base)
    cached = kdgraph.compile(kdgraph.load_spec(base, overrides=["runtime.teacher_cache=/unused"]),
                             teacher=online.teacher, student=online.student)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    with torch.no_grad():
        logits = online.teacher.eval()(x).half().float()  # what the cache stores and serves
    opt = torch.optim.SGD(online.student.parameters(), lr=1e-4, momentum=0.9)

    def step(d, **kw) -> float:
        t = time.perf_counter()
        d(x, y, **kw).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    online.train(), cached.train()
    times: dict[str, list[float]] = {"online": [], "cache": []}
    for i in range(steps + 2):
        a, b = step(online), step(cached, teacher_output=logits)
        if i >= 2:
            times["online"].append(a)
            times["cache"].append(b)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "size": size, "steps": steps, "threads": torch.get_num_threads(),
            "online_step_s": round(med["online"], 4), "cache_step_s": round(med["cache"], 4),
            "ratio": round(med["cache"] / med["online"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = {}
    if not a.skip_train:
        with tempfile.TemporaryDirectory() as tmp:
            out["fashion_mnist_kd"] = fashion_mnist(Path(tmp), a.images, a.views)
    out["kd_step_r34_r18"] = step_time(a.steps)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
