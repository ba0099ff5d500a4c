"""One training step (forward, backward, SGD step): kdgraph's fused graph vs a hand-written eager loop.

    python benchmarks/step_time.py [--specs kd at l2 ft ...] [--batch 16] [--size 112] [--steps 15]
                                   [--device cpu|cuda] [--amp off|bf16] [--channels-last] [--memory]
                                   [--fold] [--teacher-channels-last] [--teacher-dtype fp32|bf16|fp16]
                                   [--teacher-mkldnn] [--hand-adapters reference|kdgraph]

The hand-written loop is what people write without kdgraph: the teacher in eval mode under
``torch.no_grad()``, forward hooks on the tapped modules, the same adapter and loss modules (a
deep copy, same weights) called by hand, the same weighted sum, the same SGD optimiser. Both
variants run interleaved in one process (A, B, A, B, ...) after warm-up; the table reports the
median step time of each and their ratio, and the relative difference of their losses on the first
batch (before any update). ``--fold``, ``--teacher-channels-last``, ``--teacher-dtype`` and ``--teacher-mkldnn``
switch kdgraph's teacher passes on (``runtime.fold_teacher_bn``, ``teacher_channels_last``, ``teacher_dtype``,
``teacher_mkldnn``);
the hand-written loop stays the careful plain one (its teacher in the student's memory format). ``--memory`` runs each variant alone in a subprocess
and reports its peak resident memory (CPU) or peak CUDA memory.

Where kdgraph computes an adapter differently from the method's reference code, the hand-written loop
runs the reference code (``--hand-adapters reference``, the default), as a user porting the method
would: KR's ABF as the authors (and torchdistill) write it, interpolating the residual and
concatenating it with the reduced map before the attention convolution. ``--hand-adapters kdgraph``
gives the hand-written loop kdgraph's own adapter code instead, to separate the two gains.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kdgraph  # noqa: E402
from kdgraph.methods.kr import AttentionBasedFusion  # noqa: E402
from kdgraph.spec import parse_tap  # noqa: E402

ALL = ["kd", "at", "l2", "ft", "crd", "tfkd", "sskd", "pad_l2", "kr", "dist"]


def load(short: str, size: int, args=None):
    spec = kdgraph.load_spec(ROOT / "specs" / f"{short}_resnet18.yaml")
    spec.input.size = (size, size)
    if args is not None:
        spec.runtime.fold_teacher_bn = args.fold
        spec.runtime.teacher_channels_last = args.teacher_channels_last
        spec.runtime.teacher_dtype = args.teacher_dtype
        spec.runtime.teacher_mkldnn = args.teacher_mkldnn
    return spec


class ReferenceABF(AttentionBasedFusion):
    """KR's ABF as the authors write it (ReviewKD, ImageNet/models/reviewkd.py; torchdistill's
    ``AttentionBasedFusion``): upsample the residual, concatenate, attention convolution, fuse."""

    def forward(self, x, residual=None):
        if self.vector_input:
            x = x[:, :, None, None]
        x = self.reduce(x)
        if self.attention is not None:
            n, _, h, w = x.shape
            y = F.interpolate(residual, (h, w), mode="nearest")
            z = self.attention(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        return self.project(x), x


class HandWritten:
    """The eager loop: hooks capture taps; adapters and losses are called by hand."""

    def __init__(self, d: "kdgraph.distiller.Distiller", reference_adapters: bool = True):
        self.teacher = copy.deepcopy(d.teacher).eval()
        self.student = copy.deepcopy(d.student)
        self.adapters = copy.deepcopy(d.adapters)
        if reference_adapters:  # same parameters, the reference code's forward
            for a in self.adapters.values():
                if type(a) is AttentionBasedFusion:
                    a.__class__ = ReferenceABF
        self.losses = copy.deepcopy(d.losses[d.stage])
        self.transform = copy.deepcopy(d.transforms[d.stage]) if d.stage in d.transforms else None
        self.stage = d.spec.stage(d.stage)
        self.prep = d._prep
        self.captured: dict[str, torch.Tensor] = {}
        self.train_student = "student" in self.stage.train
        nets = {"teacher": self.teacher, "student": self.student}
        taps = {t for ls in self.stage.losses for t in self.prep.loss_inputs[(self.stage.name, ls.name)].values()}
        for name in list(self.adapters.keys()):
            taps |= set(self.prep.adapter_inputs[name].values())
        for text in taps:
            tap = parse_tap(text)
            if tap.source in nets and tap.path:
                net = self.prep.nets[tap.source]
                module = nets[tap.source].get_submodule(net.canonical_path(tap.path, tap))
                if tap.io == "input":
                    module.register_forward_pre_hook(lambda m, a, key=text: self.captured.__setitem__(key, a[0]))
                else:
                    module.register_forward_hook(lambda m, a, o, key=text: self.captured.__setitem__(key, o))
        train = set(self.stage.train)
        self.teacher.requires_grad_(False)
        self.student.requires_grad_(self.train_student)
        for n, a in self.adapters.items():
            a.requires_grad_(n in train)
            a.train(n in train)
        params = [p for m in [self.student, self.adapters, self.losses] for p in m.parameters() if p.requires_grad]
        self.params = params

    def value(self, text: str, batch: dict, outputs: dict, adapters_out: dict):
        tap = parse_tap(text)
        if tap.source == "batch":
            return batch[tap.path]
        if tap.source == "adapter":
            if tap.path not in adapters_out:
                kwargs = {k: self.value(t, batch, outputs, adapters_out)
                          for k, t in self.prep.adapter_inputs[tap.path].items()}
                adapters_out[tap.path] = self.adapters[tap.path](**kwargs)
            out = adapters_out[tap.path]
            return out[tap.index] if tap.index is not None else out
        if not tap.path:
            return outputs[tap.source]
        return self.captured[text]

    def __call__(self, images, targets, **extras):
        x = self.transform(images) if self.transform is not None else images
        with torch.no_grad():
            t_out = self.teacher(x)
        s_out = self.student(x) if self.train_student else None
        batch = {"images": images, "targets": targets, **extras}
        outputs = {"teacher": t_out, "student": s_out}
        adapters_out: dict = {}
        total = 0.0
        for ls in self.stage.losses:
            kwargs = {k: self.value(t, batch, outputs, adapters_out)
                      for k, t in self.prep.loss_inputs[(self.stage.name, ls.name)].items()}
            total = total + ls.weight * self.losses[ls.name](**kwargs)
        return total


def make_batch(spec, d, batch: int, device):
    c, (h, w) = spec.input.channels, spec.input.size
    b = {"images": torch.randn(batch, c, h, w, device=device),
         "targets": torch.randint(0, spec.input.num_classes, (batch,), device=device)}
    n = max((getattr(m, "num_samples", 0) for m in d.losses[d.stage].values()), default=0) or 1000
    k_neg = (spec.data.wrapper.args.get("num_negative_samples", 4096) if spec.data.wrapper else 4096)
    for k in d.batch_inputs:  # CRD: the sample index and [positive, K negatives]
        if k == "index":
            b[k] = torch.randint(0, n, (batch,), device=device)
        else:
            b[k] = torch.randint(0, n, (batch, k_neg + 1), device=device)
    return b


def build(short: str, args, device):
    spec = load(short, args.size, args)
    d = kdgraph.compile(spec)
    d.enter_stage(len(d.stages) - 1)  # the student-training stage (FT, SSKD, PAD: the last)
    d.to(device)
    hand = HandWritten(d, reference_adapters=args.hand_adapters == "reference")
    hand.teacher.to(device), hand.student.to(device), hand.adapters.to(device), hand.losses.to(device)
    if args.channels_last:
        for m in (d, hand.teacher, hand.student, hand.adapters):
            m.to(memory_format=torch.channels_last)
    d.train()
    hand.student.train(hand.train_student)
    if args.compile:
        d.use_torch_compile()
    opt_c = torch.optim.SGD(d.trainable_parameters(), lr=1e-3, momentum=0.9)
    opt_h = torch.optim.SGD(hand.params, lr=1e-3, momentum=0.9)
    batch = make_batch(spec, d, args.batch, device)
    if args.channels_last:
        batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else nullcontext()

    def step_compiled():
        with amp():
            out = d(**batch)
        opt_c.zero_grad(set_to_none=True)
        out.loss.backward()
        opt_c.step()
        return out.loss

    def step_hand():
        with amp():
            loss = hand(**batch)
        opt_h.zero_grad(set_to_none=True)
        loss.backward()
        opt_h.step()
        return loss

    def parity() -> float:
        """Relative difference of the two losses on the batch, no update."""
        with torch.no_grad(), amp():
            a, b = d(**batch).loss.float(), hand(**batch).float()
        return float(((a - b).abs() / b.abs().clamp_min(1e-12)).item())

    return {"kdgraph": step_compiled, "hand": step_hand}, parity


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_method(short: str, args, device) -> dict:
    steps, parity = build(short, args, device)
    loss_rel = parity()
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    sync(device)
    times = {k: [] for k in steps}
    for _ in range(args.steps):
        for k, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"method": short, "kdgraph_ms": 1e3 * med["kdgraph"], "hand_ms": 1e3 * med["hand"],
            "ratio": med["kdgraph"] / med["hand"], "loss_rel": loss_rel}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(short: str, variant: str, args) -> None:
    """Run one variant alone; print its peak memory (bytes) as JSON: on CUDA the peak allocated; on CPU the
    process's peak resident set (VmHWM) over the steps, and that peak minus the resident set before them."""
    device = torch.device(args.device)
    steps, _ = build(short, args, device)
    fn = steps.pop(variant)
    steps.clear()  # the other variant's modules and optimiser go
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:  # give freed heap back to the kernel, then restart the high-water mark (Linux >= 4.0)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        Path("/proc/self/clear_refs").write_text("5")
        base = _rss_kib("VmRSS") * 1024
    for _ in range(3):
        fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    print(json.dumps({"peak": peak, "step": peak - base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="*", default=ALL)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=["off", "bf16"], default="off")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the fused graph")
    ap.add_argument("--memory", action="store_true", help="also measure peak memory per variant (subprocesses)")
    ap.add_argument("--fold", action="store_true", help="kdgraph: runtime.fold_teacher_bn")
    ap.add_argument("--teacher-channels-last", action="store_true", help="kdgraph: runtime.teacher_channels_last")
    ap.add_argument("--teacher-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="kdgraph: runtime.teacher_dtype")
    ap.add_argument("--teacher-mkldnn", action="store_true", help="kdgraph: runtime.teacher_mkldnn (CPU)")
    ap.add_argument("--hand-adapters", choices=["reference", "kdgraph"], default="reference",
                    help="the hand-written loop's adapter code: the method's reference code or kdgraph's")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--_child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        memory_child(*args._child, args)
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.size}x{args.size}, amp {args.amp}, channels_last {args.channels_last}, steps {args.steps} "
          f"(median, interleaved); kdgraph teacher passes: fold {args.fold}, teacher_channels_last "
          f"{args.teacher_channels_last}, teacher_dtype {args.teacher_dtype}, teacher_mkldnn {args.teacher_mkldnn}; hand-written adapters {args.hand_adapters}")
    print(f"{'method':8} {'kdgraph ms':>11} {'hand ms':>9} {'ratio':>6} {'loss rel':>9}" + (" {:>12} {:>12} {:>15} {:>12}".format(
        "kdgraph MiB", "hand MiB", "kdgraph step", "hand step") if args.memory else ""))
    rows = []
    for short in args.specs:
        r = time_method(short, args, device)
        if args.memory:
            for variant in ("kdgraph", "hand"):
                cmd = [sys.executable, __file__, "--_child", short, variant, "--batch", str(args.batch),
                       "--size", str(args.size), "--device", args.device, "--amp", args.amp]
                if args.channels_last:
                    cmd.append("--channels-last")
                cmd += ["--teacher-dtype", args.teacher_dtype, "--hand-adapters", args.hand_adapters] \
                    + ["--fold"] * args.fold \
                    + ["--teacher-channels-last"] * args.teacher_channels_last \
                    + ["--teacher-mkldnn"] * args.teacher_mkldnn
                p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                mem = json.loads(p.stdout.strip().splitlines()[-1])
                r[f"{variant}_peak_mib"], r[f"{variant}_step_mib"] = mem["peak"] / 2**20, mem["step"] / 2**20
        rows.append(r)
        line = f"{short:8} {r['kdgraph_ms']:11.1f} {r['hand_ms']:9.1f} {r['ratio']:6.3f} {r['loss_rel']:9.1e}"
        if args.memory:
            line += (f" {r['kdgraph_peak_mib']:12.0f} {r['hand_peak_mib']:12.0f} {r['kdgraph_step_mib']:15.0f}"
                     f" {r['hand_step_mib']:12.0f}")
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
