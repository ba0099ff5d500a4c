"""Run a suite: every entry for every seed through ``kdgraph train``'s runtime, one run folder each.

Layout of ``OUT``::

    OUT/<label>/seed<k>/     a run folder exactly as ``kdgraph train --out`` makes it (last.pt, results.json, ...)
    OUT/results.{tsv,md,json,png,svg}     the table (see :mod:`kdgraph.bench.report`)

A run whose folder holds a ``results.json`` for the same spec (its ``spec.json`` equal to the entry's
spec with overrides and seed applied) is finished and never trained again; a run that stopped midway
continues from its ``last.pt``; a run whose spec changed since is started over (and said so). A run
that fails is recorded with its message (``failed.json``) and the suite goes on.
"""
from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import KDGraphError, SpecError
from ..spec import Spec
from .suite import LoadedSuite, SuiteEntry


@dataclass
class RunResult:
    """One entry x seed."""

    label: str
    seed: int
    out: str
    status: str  # "done" | "failed" | "planned"
    top1: Optional[float] = None
    top5: Optional[float] = None
    teacher_top1: Optional[float] = None
    perplexity: Optional[float] = None  # a causal LM's validation perplexity (data.dataset text)
    wall_s: Optional[float] = None  # training time of this run, the teacher's one-time pretraining excluded
    pretrain_s: float = 0.0
    images_per_s: Optional[float] = None
    error: Optional[str] = None
    reused: bool = False  # finished before this invocation


@dataclass
class PlannedRun:
    entry: SuiteEntry
    seed: int
    spec: Optional[Spec]  # None when the entry's spec is invalid (``error`` says why)
    out: Path
    error: Optional[str] = None


@dataclass
class SuiteProgress:
    """What the suite-wide progress row shows (read by the training monitor above its epoch bar)."""

    title: str
    total: int
    done: int = 0
    seconds: list[float] = field(default_factory=list)  # wall time of runs trained in this invocation
    current: str = ""

    def eta_s(self) -> Optional[float]:
        if not self.seconds:
            return None
        return (sum(self.seconds) / len(self.seconds)) * (self.total - self.done)

    def text(self) -> str:
        eta = self.eta_s()
        eta_txt = f", eta {eta / 60:.0f} min" if eta is not None else ""
        return f"suite {self.done}/{self.total} runs{eta_txt}: {self.current}"


def plan_runs(loaded: LoadedSuite, out: Path, seeds: list[int], only: Optional[list[str]] = None) -> list[PlannedRun]:
    """Every (entry, seed) to run, specs loaded and checked (a bad spec fails here, before any training)."""
    labels = [e.label for e in loaded.suite.entries]
    if only:
        unknown = [o for o in only if o not in labels]
        if unknown:
            from ..errors import did_you_mean

            raise SpecError(f"--only {unknown[0]!r}: no entry has that label.{did_you_mean(unknown[0], labels)} "
                            f"Labels: {', '.join(labels)}")
    runs = []
    for entry in loaded.suite.entries:
        if only and entry.label not in only:
            continue
        for seed in seeds:
            folder = out / entry.label / f"seed{seed}"
            try:
                runs.append(PlannedRun(entry, seed, loaded.load_entry(entry, seed), folder))
            except SpecError as e:  # reported as a failed row; the other entries still run
                runs.append(PlannedRun(entry, seed, None, folder, error=str(e)))
    return runs


def _spec_json(spec: Spec) -> Any:
    return json.loads(json.dumps(spec.model_dump(mode="json")))


def finished_result(run: PlannedRun) -> Optional[dict[str, Any]]:
    """The run's results.json when it finished with exactly this spec, else None."""
    res_path, spec_path = run.out / "results.json", run.out / "spec.json"
    if not res_path.is_file() or not spec_path.is_file():
        return None
    try:
        res = json.loads(res_path.read_text())
        saved = json.loads(spec_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (res.get("student") or {}).get("top1") is None or not _same_spec(saved, run.spec):
        return None
    return res


def _same_spec(saved: Any, spec: Spec) -> bool:
    """The saved spec is this spec: equal as saved, or equal once read by today's schema (a run saved before a field
    was added to the schema has no value for it; the field's default, which keeps the earlier behaviour, fills in)."""
    current = _spec_json(spec)
    if saved == current:
        return True
    try:
        return _spec_json(Spec.model_validate(saved)) == current
    except Exception:  # a spec today's schema refuses is not this spec
        return False


def spec_changed(run: PlannedRun) -> bool:
    spec_path = run.out / "spec.json"
    if not spec_path.is_file():
        return False
    try:
        return json.loads(spec_path.read_text()) != _spec_json(run.spec)
    except (OSError, json.JSONDecodeError):
        return True


def median_images_per_s(run_dir: Path) -> Optional[float]:
    """Median training throughput of a run (its own steps; a cached network's pretraining excluded)."""
    path = run_dir / "metrics.jsonl"
    vals = []
    try:
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == "train" and not rec.get("pretrain") and isinstance(rec.get("images_per_s"), (int, float)):
                vals.append(float(rec["images_per_s"]))
    except OSError:
        return None
    if not vals:
        return None
    vals.sort()
    n = len(vals)
    return vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])


def result_from(run: PlannedRun, res: dict[str, Any], reused: bool) -> RunResult:
    student = res.get("student") or {}
    teacher = res.get("teacher") or {}
    pre = float(res.get("pretrain_s") or 0.0)
    wall = res.get("wall_s")
    return RunResult(run.entry.label, run.seed, str(run.out), "done", top1=student.get("top1"),
                     top5=student.get("top5"), teacher_top1=teacher.get("top1"),
                     perplexity=student.get("perplexity"),
                     wall_s=round(float(wall) - pre, 1) if wall is not None else None, pretrain_s=pre,
                     images_per_s=median_images_per_s(run.out), reused=reused)


def _train_one(spec_data: dict, out: str, data: Optional[str], device: Optional[str], progress: Optional[bool],
               resume: bool, threads: int, allow_imports: tuple[str, ...] = ()
               ) -> tuple[Optional[dict], Optional[str], Optional[str]]:
    """Train one run (in this process or a worker process): (results, error message, traceback).
    ``allow_imports``: the consent of the calling process (kdgraph.models.trust), handed to a worker process."""
    import torch

    from ..train.loop import TrainOptions, train

    if threads > 0:
        torch.set_num_threads(threads)
    try:
        res = train(spec_data, TrainOptions(out=Path(out), data=data, resume=resume, overwrite=not resume,
                                            device=device, progress=progress, allow_imports=tuple(allow_imports)))
        return res, None, None
    except KeyboardInterrupt:
        raise
    except KDGraphError as e:
        return None, str(e), None
    except Exception as e:  # noqa: BLE001 - one broken run must not stop the suite; logged in full
        return None, f"{type(e).__name__}: {e}", traceback.format_exc()


def _teacher_key(run: PlannedRun) -> Optional[str]:
    """The cached network a run would train first (None when it needs none)."""
    from ..train.pretrain import weights_path
    from ..weights import shipped

    for role in ("teacher", "student"):
        ref = getattr(run.spec, role)
        if ref.pretrain is not None:
            path = weights_path(ref, run.spec, role)
            if path is not None and not path.exists() and shipped(path, role) is None:
                return str(path)
    return None


def execute(runs: list[PlannedRun], *, data: Optional[str], device: Optional[str], progress: Optional[bool],
            fresh: bool, title: str, say: Callable[[str], None], is_main: bool = True, jobs: int = 1) -> list[RunResult]:
    """Train every planned run that is not finished yet; failures are recorded, never raised.

    With ``jobs > 1`` (CPU), that many runs train at once in worker processes, each with
    ``cpu_count // jobs`` threads (small networks use a CPU's cores better this way); the runs that
    first train a cached network (a teacher) go first, one at a time, so it is trained once.
    """
    from ..train import monitor as monitor_mod

    results: list[RunResult] = []
    todo: list[PlannedRun] = []
    for run in runs:
        if run.spec is None:
            results.append(_failed(run, run.error or "invalid spec", None, is_main))
            continue
        res = None if fresh else finished_result(run)
        if res is not None:
            results.append(result_from(run, res, reused=True))
        else:
            todo.append(run)
    reused = sum(1 for r in results if r.reused)
    if reused:
        say(f"{reused} of {len(runs)} run(s) already finished in their folders: not trained again")
    bar = SuiteProgress(title, total=len(runs), done=len(results))

    def finish(run: PlannedRun, outcome: tuple, t0: float) -> None:
        res, err, tb = outcome
        if res is not None:
            r = result_from(run, res, reused=False)
            (run.out / "failed.json").unlink(missing_ok=True)
        else:
            r = _failed(run, err or "unknown error", tb, is_main)
            say(f"[bold red]{run.entry.label} seed {run.seed} failed:[/] {r.error}")
        results.append(r)
        bar.done += 1
        bar.seconds.append(r.wall_s if r.wall_s is not None else time.perf_counter() - t0)

    def resume_flag(run: PlannedRun) -> bool:
        changed = spec_changed(run)
        if changed:
            say(f"[yellow]{run.out}: the spec changed since this run was made; starting it over[/]")
        return not (fresh or changed)

    first, rest, seen = [], [], set()
    for run in todo:
        key = _teacher_key(run) if jobs > 1 else None
        (first if key is not None and key not in seen else rest).append(run)
        if key is not None:
            seen.add(key)
    monitor_mod.SUITE_PROGRESS = bar
    try:
        for run in (todo if jobs <= 1 else first):
            bar.current = f"{run.entry.label} seed {run.seed}"
            say(f"[bold]== {bar.text()}[/]")
            t0 = time.perf_counter()
            finish(run, _train_one(run.spec.model_dump(mode="json"), str(run.out), data, device, progress,
                                   resume_flag(run), 0), t0)
        if jobs > 1 and rest:
            _parallel(rest, jobs, data, device, fresh, say, bar, finish, resume_flag)
    finally:
        monitor_mod.SUITE_PROGRESS = None
    order = {(p.entry.label, p.seed): i for i, p in enumerate(runs)}
    return sorted(results, key=lambda r: order[(r.label, r.seed)])


def _parallel(runs: list[PlannedRun], jobs: int, data, device, fresh, say, bar, finish, resume_flag) -> None:
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from ..models.trust import allowed_prefixes

    threads = max(1, (os.cpu_count() or 1) // jobs)
    say(f"{len(runs)} run(s) on {jobs} worker processes x {threads} thread(s)")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {}
        for run in runs:
            fut = pool.submit(_train_one, run.spec.model_dump(mode="json"), str(run.out), data, device, False,
                              resume_flag(run), threads, allowed_prefixes())
            futures[fut] = (run, time.perf_counter())
        for fut in as_completed(futures):
            run, t0 = futures[fut]
            try:
                outcome = fut.result()
            except Exception as e:  # noqa: BLE001 - a worker that died (killed, out of memory)
                outcome = (None, f"worker process failed: {type(e).__name__}: {e}", None)
            bar.current = f"{run.entry.label} seed {run.seed} finished"
            finish(run, outcome, t0)
            say(f"[bold]== {bar.text()}[/]")


def _failed(run: PlannedRun, message: str, tb: Optional[str], is_main: bool) -> RunResult:
    if is_main:
        try:
            run.out.mkdir(parents=True, exist_ok=True)
            (run.out / "failed.json").write_text(json.dumps({"error": message, "traceback": tb}, indent=2))
        except OSError:
            pass
    return RunResult(run.entry.label, run.seed, str(run.out), "failed", error=message)
