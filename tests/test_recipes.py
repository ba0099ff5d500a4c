"""The training recipe (stages[i].optimizer / scheduler / clip_grad / accumulate / ema): lr traces against
transformers' and torch's schedulers, clipping under an fp16 GradScaler, accumulation against one larger batch
(one process and 2 gloo processes), parameter groups, EMA through eval / export, and the errors of bad input."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

import kdgraph
from kdgraph.errors import SpecError
from kdgraph.spec import describe_recipe
from kdgraph.spec.recipe import EmaSpec, SchedulerSpec
from kdgraph.train import train
from kdgraph.train.checkpoint import Checkpoint
from kdgraph.train.ema import StudentEMA
from kdgraph.train.optim import build_optimizer
from kdgraph.train.schedule import build_scheduler
from kdgraph.train.steps import StageRun, optimizer_step

sys.path.insert(0, str(Path(__file__).parent))
from test_train import QUIET, tiny_spec, write_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LR, EPOCHS, PER_EPOCH = 0.1, 3, 7  # 21 optimizer steps, two epoch boundaries


def _stage(**sched):
    opt = SimpleNamespace(lr=LR)
    return SimpleNamespace(name="main", epochs=EPOCHS, accumulate=1, optimizer=opt,
                           scheduler=SchedulerSpec(interval="step", **sched))


def _trace(sched, n=EPOCHS * PER_EPOCH):
    """The lr each of ``n`` optimizer steps uses (the scheduler stepped after each)."""
    out = []
    opt = sched.optimizer
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out + [opt.param_groups[0]["lr"]]  # after the last step


def _opt():
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)


@pytest.mark.parametrize("kind,hf", [
    ("linear", lambda o, w, t: transformers.get_linear_schedule_with_warmup(o, w, t)),
    ("cosine", lambda o, w, t: transformers.get_cosine_schedule_with_warmup(o, w, t)),
    ("polynomial", lambda o, w, t: transformers.get_polynomial_decay_schedule_with_warmup(o, w, t, lr_end=1e-3,
                                                                                           power=2.0)),
    ("cosine_floor", lambda o, w, t: transformers.get_cosine_with_min_lr_schedule_with_warmup(o, w, t, min_lr=1e-3)),
])
def test_per_step_lr_traces_equal_transformers_schedules_with_warmup(kind, hf):
    extra = {"polynomial": {"power": 2.0, "min_lr": 1e-3}, "cosine_floor": {"min_lr": 1e-3}}.get(kind, {})
    stage = _stage(type=kind.split("_")[0], warmup_steps=4, **extra)
    ours = _trace(build_scheduler(stage, _opt(), PER_EPOCH))
    ref = _trace(hf(_opt(), 4, EPOCHS * PER_EPOCH))
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert ours[0] == 0.0 and ours[4] == pytest.approx(LR)  # warm-up from 0, the full lr after 4 steps


def test_step_and_epoch_warmup_traces_equal_torchs_sequential_schedulers():
    # step decay every 1.5 epochs (fractional, as DIST's 2.4) after a 1-epoch warm-up from 0.01
    stage = _stage(type="step", step_size=1.5, gamma=0.5, warmup_epochs=1.0, warmup_lr=0.01)
    ours = _trace(build_scheduler(stage, _opt(), PER_EPOCH))
    o = _opt()
    ref = torch.optim.lr_scheduler.SequentialLR(o, [
        torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=PER_EPOCH),
        torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.5 ** math.floor(t / (1.5 * PER_EPOCH)))],
        milestones=[PER_EPOCH])
    assert ours == pytest.approx(_trace(ref), rel=1e-9)
    # the same schedule stepped per epoch: one value per epoch
    epochly = SimpleNamespace(**{**vars(_stage()), "scheduler": SchedulerSpec(type="cosine", warmup_epochs=1,
                                                                              min_lr=0.01)})
    per_epoch = _trace(build_scheduler(epochly, _opt(), PER_EPOCH), n=EPOCHS)
    o = _opt()
    ref = torch.optim.lr_scheduler.SequentialLR(o, [
        torch.optim.lr_scheduler.LinearLR(o, start_factor=1e-12, end_factor=1.0, total_iters=1),
        torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=EPOCHS - 1, eta_min=0.01)], milestones=[1])
    assert per_epoch[1:] == pytest.approx(_trace(ref, n=EPOCHS)[1:], rel=1e-9) and per_epoch[0] == 0.0


def test_the_glue_linear_schedule_reaches_zero_at_the_last_step():
    spec = kdgraph.load_spec(ROOT / "specs" / "glue" / "cola.yaml")
    st = spec.stages[0]
    stage = SimpleNamespace(name="main", epochs=st.epochs, accumulate=1, optimizer=st.optimizer,
                            scheduler=st.scheduler)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=st.optimizer.lr)
    trace = _trace(build_scheduler(stage, opt, 5), n=st.epochs * 5)
    assert trace[0] == st.optimizer.lr and trace[-2] == pytest.approx(st.optimizer.lr / 15) and trace[-1] == 0.0


def _run(model, opt, stage, scaler=None):
    return StageRun("main", 0, stage, model, model, None, None, opt, None, scaler, 1.0, [], False, "never")


def test_clipping_under_an_fp16_gradscaler_clips_the_unscaled_gradients():
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    stage = SimpleNamespace(clip_grad=SimpleNamespace(max_norm=0.05, norm_type=2.0, max_value=None),
                            scheduler=None)
    nets = [nn.Linear(5, 3) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    before = nets[0].weight.detach().clone()
    # reference: fp32, no scaler; the gradient clipped to norm 0.05, one SGD step of lr 1
    opt = torch.optim.SGD(nets[0].parameters(), lr=1.0)
    nn.functional.mse_loss(nets[0](x), y).backward()
    grads = [p.grad.clone() for p in nets[0].parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm > 0.05  # clipping does something
    optimizer_step(_run(nets[0], opt, stage))
    # under a GradScaler whose scale is 2^12: the same update, not one clipped 4096 times too hard
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    opt = torch.optim.SGD(nets[1].parameters(), lr=1.0)
    scaler.scale(nn.functional.mse_loss(nets[1](x), y)).backward()
    optimizer_step(_run(nets[1], opt, stage, scaler))
    torch.testing.assert_close(nets[0].weight, before - grads[0] * 0.05 / norm, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(nets[1].weight, nets[0].weight, rtol=1e-5, atol=1e-7)


def test_parameter_groups_no_decay_on_norm_and_bias_lr_multipliers():
    spec = kdgraph.load_spec(tiny_spec(name="groups"))
    st = spec.stages[0]
    st.optimizer.no_decay = ["bias", "norm"]
    st.optimizer.param_groups = [kdgraph.spec.recipe.ParamGroupSpec(params="student.fc.*", lr_mult=10.0)]
    d = kdgraph.compile(spec)
    opt = build_optimizer(st, d.trainable_parameters(), 0.05, d)
    wd_of, lr_of = {}, {}
    for g in opt.param_groups:
        for p in g["params"]:
            wd_of[id(p)], lr_of[id(p)] = g["weight_decay"], g["lr"]
    bn = next(m for m in d.student.modules() if isinstance(m, nn.BatchNorm2d))
    conv = next(m for m in d.student.modules() if isinstance(m, nn.Conv2d))
    assert wd_of[id(bn.weight)] == wd_of[id(bn.bias)] == 0.0 and wd_of[id(conv.weight)] == 1e-4
    assert conv.bias is None or wd_of[id(conv.bias)] == 0.0
    assert lr_of[id(d.student.fc.weight)] == pytest.approx(0.5) and wd_of[id(d.student.fc.weight)] == 1e-4
    assert lr_of[id(d.student.fc.bias)] == pytest.approx(0.5) and wd_of[id(d.student.fc.bias)] == 0.0
    assert lr_of[id(conv.weight)] == 0.05
    assert sum(len(g["params"]) for g in opt.param_groups) == len(d.trainable_parameters())
    assert "no decay on bias/norm; group student.fc.*: lr x 10" in describe_recipe(st)
    from kdgraph.cli.compile import compile_summary  # what `kdgraph compile` prints (and --json gives)

    assert compile_summary(d)["stages"][0]["recipe"] == describe_recipe(st)


def test_layer_decay_and_rmsprop_tf():
    spec = kdgraph.load_spec(tiny_spec(name="layers", student_norm="none"))
    st = spec.stages[0]
    d = kdgraph.compile(spec)
    names = [n for n, _ in d.named_parameters() if n.startswith("student.")]
    assert "student.layer1.0.weight" in names, names
    st.optimizer.type, st.optimizer.momentum = "rmsprop_tf", 0.9
    st.optimizer.layer_decay = kdgraph.spec.recipe.LayerDecaySpec(rate=0.5, layers="student.layer#.*")
    opt = build_optimizer(st, d.trainable_parameters(), 0.05, d)
    import timm.optim

    assert isinstance(opt, timm.optim.RMSpropTF)
    numbers = sorted({int(n.split(".")[1][len("layer"):]) for n in names if n.startswith("student.layer")})
    n_layers = numbers[-1] + 1  # '#' is read as a 0-based layer number: layerN is layer N + 1 of n_layers
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    params = dict(d.named_parameters())
    for i in numbers:
        assert lr_of[id(params[f"student.layer{i}.0.weight"])] == pytest.approx(0.05 * 0.5 ** (n_layers - i))
    assert lr_of[id(d.student.fc.weight)] == 0.05  # after the last layer: the full lr


def test_rmsprop_tf_without_timm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm.optim", None)
    spec = kdgraph.load_spec(tiny_spec(name="notimm"))
    spec.stages[0].optimizer.type = "rmsprop_tf"
    with pytest.raises(SpecError, match=r"timm's RMSpropTF.*pip install 'kdgraph\[timm\]'"):
        build_optimizer(spec.stages[0], [nn.Parameter(torch.zeros(2))], 0.1)


def test_ema_is_the_exponential_average_of_weights_and_float_buffers():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = StudentEMA(net, EmaSpec(decay=0.75, every=2))
    history = []
    for step in range(6):
        with torch.no_grad():
            net[0].weight.add_(1.0)
            net[1].running_mean.add_(2.0)
            net[1].num_batches_tracked += 1
        history.append((net[0].weight.clone(), net[1].running_mean.clone()))
        ema.update(net)
    # updated after steps 2, 4, 6: the first copies, then ema = 0.75 ema + 0.25 x
    w = history[1][0]
    m = history[1][1]
    for i in (3, 5):
        w, m = 0.75 * w + 0.25 * history[i][0], 0.75 * m + 0.25 * history[i][1]
    torch.testing.assert_close(ema.module[0].weight, w)
    torch.testing.assert_close(ema.module[1].running_mean, m)
    assert int(ema.module[1].num_batches_tracked) == 6 and ema.steps == 6


@pytest.mark.parametrize("field,value,match", [
    ("scheduler", {"type": "cosine", "interval": "step", "warmup_steps": -1}, r"warmup_steps.*greater than or equal to 0"),
    ("scheduler", {"type": "cosine", "warmup_epochs": 2}, r"warmup_epochs 2 is not shorter than the stage's 2 epoch"),
    ("clip_grad", {"max_norm": 0}, r"clip_grad.max_norm.*greater than 0"),
    ("clip_grad", {"max_norm": 1.0, "max_value": 1.0}, r"exactly one of max_norm"),
    ("ema", {"decay": 1.0}, r"ema.decay.*less than 1"),
    ("optimizer", {"type": "adamw", "lr": 0.1, "betas": [0.9, 0.999], "momentum": 0.9, "nesterov": True},
     r"nesterov applies to optimizer type sgd"),
    ("optimizer", {"type": "lamb", "lr": 0.1}, r"unknown optimizer type 'lamb'; allowed: sgd, adam, adamw, rmsprop"),
])
def test_bad_recipe_input_is_one_clear_spec_error(field, value, match):
    spec = tiny_spec(name="bad", epochs=2)
    spec["stages"][0][field] = value
    with pytest.raises(SpecError, match=match) as e:
        kdgraph.load_spec(spec)
    assert "stages[0]" in str(e.value)


def test_a_warmup_longer_than_the_stage_is_a_spec_error_before_any_step(tmp_path):
    spec = tiny_spec(name="longwarm", train_subset=64)  # 2 steps per epoch, 1 epoch
    spec["stages"][0]["scheduler"] = {"type": "linear", "interval": "step", "warmup_steps": 5}
    with pytest.raises(SpecError, match=r"stages.main.scheduler: the warm-up \(5 steps\) is not shorter than the "
                                        r"stage \(1 epoch\(s\) x 2 step\(s\) = 2\)"):
        train(spec, out=tmp_path / "run", **QUIET)
    assert not (tmp_path / "run" / "last.pt").exists()


def _accum_spec(name, batch, k):
    spec = tiny_spec(name=name, train_subset=128, batch_size=batch, student_norm="group")
    spec["stages"][0].update(accumulate=k, clip_grad={"max_norm": 0.5},
                             scheduler={"type": "linear", "interval": "step", "warmup_steps": 1})
    return spec


def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger(tmp_path):
    """2 x 32 accumulated vs 64 at once, group norm (per example) in the student: the same 2 optimizer steps
    (per-step schedule, clipping) give the same student up to float rounding (rtol 1e-5, atol 1e-6)."""
    a = train(_accum_spec("acc2", 32, 2), out=tmp_path / "a", **QUIET)
    b = train(_accum_spec("acc1", 64, 1), out=tmp_path / "b", **QUIET)
    ca, cb = Checkpoint.load(tmp_path / "a" / "last.pt"), Checkpoint.load(tmp_path / "b" / "last.pt")
    assert ca.scheduler["last_epoch"] == cb.scheduler["last_epoch"] == 2 and a["stages"][0]["effective_batch"] == 32
    assert "linear per step, warm-up 1 steps; clip norm 0.5; accumulate 2 micro-batches" in a["stages"][0]["recipe"]
    for k, v in cb.student.items():
        torch.testing.assert_close(ca.student[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert not torch.equal(ca.student["fc.weight"], kdgraph.compile(kdgraph.load_spec(_accum_spec("x", 64, 1)))
                           .student.fc.weight)  # it trained


def test_two_gloo_processes_with_accumulation_equal_one_process_on_the_global_batch(tmp_path):
    """2 processes x 16 x accumulate 2 == 1 process x 64: the union of each step's micro-batches is the same
    64 images (rank r reads every other index), DDP all-reduces only on the last micro-batch."""
    path = write_spec(tmp_path / "ddp.yaml", _accum_spec("ddp", 16, 2))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "kdgraph", "train", str(path), "--out", str(tmp_path / "two"), "--device", "cpu",
                           "--no-progress", "--set", "stages.main.reference_world_size=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "recipe: sgd lr 0.05" in proc.stdout and "accumulate 2 micro-batches" in proc.stdout
    train(_accum_spec("ddp", 64, 1), out=tmp_path / "one", **QUIET)
    a, b = Checkpoint.load(tmp_path / "one" / "last.pt"), Checkpoint.load(tmp_path / "two" / "last.pt")
    assert a.global_step == 2 and b.global_step == 4  # micro-batches per process
    for k, v in a.student.items():
        torch.testing.assert_close(b.student[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_the_ema_is_what_eval_reports_and_export_writes(tmp_path):
    spec = tiny_spec(name="ema", train_subset=128, val_subset=64)
    spec["stages"][0]["ema"] = {"decay": 0.5}
    path = write_spec(tmp_path / "ema.yaml", spec)
    res = train(path, out=tmp_path / "run", **QUIET)
    ck = Checkpoint.load(tmp_path / "run" / "last.pt")
    raw = {k[len("student."):]: v for k, v in ck.distiller.items() if k.startswith("student.")}
    ema = {k[len("module."):]: v for k, v in ck.ema["model"].items() if k.startswith("module.")}
    assert ck.ema["steps"] == 4 and set(ema) == set(raw) == set(ck.student)
    assert all(torch.equal(ck.student[k], ema[k]) for k in ema)
    assert not torch.equal(ck.student["fc.weight"], raw["fc.weight"])  # the EMA, not the last weights
    from kdgraph.train.export import evaluate_checkpoint, export_student  # what `kdgraph export` / `eval` call

    export_student(tmp_path / "run" / "last.pt", tmp_path / "s.pt")
    exported = torch.load(tmp_path / "s.pt", weights_only=True)
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    ev = evaluate_checkpoint(kdgraph.load_spec(path), str(tmp_path / "run" / "last.pt"), device="cpu")
    assert ev["top1"] == pytest.approx(res["student"]["top1"])
