"""Throughput of ``kdgraph train`` on the embedded default vs the same work in a hand-written loop.

Both do the KD step of specs/fashion_mnist/kd.yaml (ResNet-34 teacher forward, ResNet-18 student
forward + backward, 0.5 * CE + 0.5 * T^2 * KL with T = 2, AdamW, channels_last, fp32) on
Fashion-MNIST batches of 128 with random crops and flips, one epoch over ``--images`` training
images. Each is a fresh process, run alternately ``--repeats`` times; the figures are medians:

* images/s of the training steps (the median of the per-step rates, as the trainer records them);
* time from command start (the process is launched) to the end of the first training step.

The hand-written loop reads the same uint8 tensors and builds the same models, with no spec, no fx
graph, no checkpoints, no evaluation: it is the floor the trainer's overhead is measured against.
The teacher is random here (its weights do not change the cost), so no cached teacher is needed::

    python benchmarks/train_throughput.py --repeats 3 --images 5120
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HAND_LOOP = r'''
import json, statistics, sys, time
t_proc = float(sys.argv[1]); n_images = int(sys.argv[2])
import torch
import torch.nn.functional as F
sys.path.insert(0, sys.argv[3])
from kdgraph.train.data import load_fashion_mnist, FASHION_MEAN, FASHION_STD
from kdgraph.models.zoo import resnet18_small, resnet34_small
torch.manual_seed(0)
teacher = resnet34_small().eval().to(memory_format=torch.channels_last)
student = resnet18_small().train().to(memory_format=torch.channels_last)
for p in teacher.parameters():
    p.requires_grad_(False)
images, labels = load_fashion_mnist(None, "train")
images, labels = images[:n_images], labels[:n_images]
opt = torch.optim.AdamW(student.parameters(), lr=0.002, weight_decay=1e-4)
B, T = 128, 2.0
perm = torch.randperm(n_images)
rates, first = [], None
for s in range(n_images // B):
    t0 = time.perf_counter()
    idx = perm[s * B:(s + 1) * B]
    x = images[idx]
    shift = torch.randint(0, 5, (2,))
    x = F.pad(x, (2, 2, 2, 2))[:, shift[0]:shift[0] + 28, shift[1]:shift[1] + 28]
    flip = torch.rand(B) < 0.5
    x = torch.where(flip[:, None, None], x.flip(-1), x)
    x = ((x.unsqueeze(1).float() / 255 - FASHION_MEAN) / FASHION_STD).contiguous(memory_format=torch.channels_last)
    y = labels[idx]
    with torch.no_grad():
        zt = teacher(x)
    zs = student(x)
    kd = F.kl_div(F.log_softmax(zs / T, 1), F.log_softmax(zt / T, 1), reduction="batchmean", log_target=True) * T * T
    loss = 0.5 * F.cross_entropy(zs, y) + 0.5 * kd
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    float(loss)
    rates.append(B / (time.perf_counter() - t0))
    if first is None:
        first = time.time() - t_proc
print(json.dumps({"images_per_s": statistics.median(rates), "first_step_s": first}))
'''


def run_kdgraph(images: int, work: Path) -> dict:
    out = work / "kd"
    t = time.time()
    cmd = [sys.executable, "-m", "kdgraph", "train", str(ROOT / "specs" / "fashion_mnist" / "kd.yaml"),
           "--out", str(out), "--overwrite", "--no-progress", "--device", "cpu",
           "--set", "teacher.weights=null", "--set", "teacher.pretrain=null", "--set", "runtime.eval_teacher=false",
           "--set", "stages.main.epochs=1", "--set", f"data.train_subset={images}", "--set", "data.val_subset=128"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["event"] == "train"]
    res = json.loads((out / "results.json").read_text())
    return {"images_per_s": res["stages"][0]["train_images_per_s"], "first_step_s": train[0]["time"] - t}


def run_hand(images: int, work: Path) -> dict:
    script = work / "hand_loop.py"
    script.write_text(HAND_LOOP)
    t = time.time()
    p = subprocess.run([sys.executable, str(script), str(t), str(images), str(ROOT)], check=True,
                       capture_output=True, text=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=5120, help="training images per run (40 steps of 128)")
    args = ap.parse_args()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    rows: dict[str, list[dict]] = {"kdgraph train": [], "hand-written loop": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for i in range(args.repeats):
            for name, fn in (("kdgraph train", run_kdgraph), ("hand-written loop", run_hand)):
                r = fn(args.images, work)
                rows[name].append(r)
                print(f"run {i + 1} {name:18}: {r['images_per_s']:7.1f} images/s, first step after "
                      f"{r['first_step_s']:.1f} s", flush=True)
    print(f"\nmedians over {args.repeats} interleaved runs, {args.images} images, batch 128, "
          f"threads {env_threads or 'default'}:")
    summary = {}
    for name, rs in rows.items():
        ips = statistics.median(r["images_per_s"] for r in rs)
        first = statistics.median(r["first_step_s"] for r in rs)
        summary[name] = {"images_per_s": round(ips, 1), "first_step_s": round(first, 2)}
        print(f"  {name:18} {ips:7.1f} images/s   command start -> first step done: {first:.1f} s")
    k, h = summary["kdgraph train"]["images_per_s"], summary["hand-written loop"]["images_per_s"]
    print(f"  kdgraph / hand-written: {k / h:.3f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
