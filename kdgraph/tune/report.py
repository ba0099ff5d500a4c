"""What a tune leaves in its folder: the trials table, the best overrides, a suite to bench them, the pictures.

    OUT/trials.tsv, trials.md     every trial: number, state, score, epochs reported, its overrides, times
    OUT/best.json                 the best trial: score, ``set`` (the --set list), ``validation_set``, the commands
    OUT/best_set.txt              the --set list, one ``--set KEY=VALUE`` per line
    OUT/tuned_suite.yaml          a suite ``kdgraph bench`` runs: the spec as is vs with the best overrides
    OUT/history.png, importance.png, slice.png, contour.png, intermediate.png
                                  optuna.visualization.matplotlib (a plot that needs more trials is skipped)

Surplus trials (a race between workers, see :mod:`kdgraph.tune.study`) are left out.
"""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any, Optional

from .study import SURPLUS_ATTR

__all__ = ["TuneResult", "summarize", "write_all"]


class TuneResult(dict):
    """What :func:`kdgraph.tune.tune` returns: ``best`` (number, value, set), ``trials`` (rows), ``files``."""

    @property
    def best(self) -> Optional[dict[str, Any]]:
        return self.get("best")

    @property
    def trials(self) -> list[dict[str, Any]]:
        return self["trials"]


def _local_times(out: Any) -> dict[str, Any]:
    """The trial's tune.json (written after its final ``tell``) when this host ran it."""
    try:
        return json.loads((Path(out) / "tune.json").read_text()) if out else {}
    except (OSError, ValueError):
        return {}


def _row(t: Any) -> dict[str, Any]:
    a = t.user_attrs
    done = t.datetime_complete and t.datetime_start
    local = _local_times(a.get("out"))
    return {"number": t.number, "state": t.state.name, "value": t.value,
            "epochs": len(t.intermediate_values), "last_reported": t.intermediate_values.get(
                max(t.intermediate_values)) if t.intermediate_values else None,
            "set": list(a.get("set", [])), "train_s": a.get("train_s"), "overhead_s": local.get("overhead_s", a.get("overhead_s")),
            "wall_s": round((t.datetime_complete - t.datetime_start).total_seconds(), 1) if done else None,
            "error": a.get("error") or a.get("kdgraph_failed"), "out": a.get("out")}


def summarize(study: Any, spec_path: str, space_path: str, fixed: list[str], out: Path, n_trials: int) -> TuneResult:
    from optuna.trial import TrialState

    rows = [_row(t) for t in study.trials if not t.user_attrs.get(SURPLUS_ATTR)]
    complete = [r for r in rows if r["state"] == TrialState.COMPLETE.name]
    best = max(complete, key=lambda r: (r["value"], -r["number"])) if complete else None
    res = TuneResult(study=study.study_name, spec=spec_path, space=space_path, fixed=list(fixed), trials=rows,
                     target_trials=n_trials, best=None)
    if best is not None:
        sets = best["set"]
        args = " ".join(f"--set {shlex.quote(s)}" for s in sets)
        fixed_args = " ".join(f"--set {shlex.quote(s)}" for s in fixed)
        res["best"] = {"number": best["number"], "value": best["value"], "set": sets, "validation_set": list(fixed),
                       "train_command": f"kdgraph train {shlex.quote(spec_path)} {args}".strip(),
                       "reproduce_command": f"kdgraph train {shlex.quote(spec_path)} {fixed_args} {args}".strip()}
    overheads = [r["overhead_s"] for r in rows if isinstance(r.get("overhead_s"), (int, float))]
    res["overhead_s_median"] = sorted(overheads)[len(overheads) // 2] if overheads else None
    return res


def _table(rows: list[dict[str, Any]]) -> tuple[str, str]:
    head = ["trial", "state", "score", "epochs", "train s", "overhead s", "overrides"]
    tsv = ["\t".join(["trial", "state", "value", "epochs", "train_s", "overhead_s", "set", "error"])]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        score = r["value"] if r["value"] is not None else r["last_reported"]
        cells = [str(r["number"]), r["state"].lower(), f"{score:.2f}" if score is not None else "",
                 str(r["epochs"]), f"{r['train_s']:.1f}" if r["train_s"] is not None else "",
                 f"{r['overhead_s']:.3f}" if r["overhead_s"] is not None else "", " ".join(r["set"])]
        md.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        tsv.append("\t".join(cells[:6] + [" ".join(r["set"]), (r["error"] or "").replace("\t", " ").replace("\n", " ")]))
    return "\n".join(tsv) + "\n", "\n".join(md) + "\n"


def _suite(res: TuneResult, out: Path) -> str:
    spec = os.path.relpath(Path(res["spec"]).resolve(), out.resolve())
    sets = json.dumps(res["best"]["set"]) if res.get("best") else "[]"
    return (f"# written by kdgraph tune (study {res['study']!r}): the spec with its own weights vs the best trial's\n"
            f"# overrides, trained on the full training split and scored on the evaluation split.\n"
            f"#   kdgraph bench {out / 'tuned_suite.yaml'}\n"
            f"title: \"{Path(res['spec']).stem}: reference weights vs tuned (trial {res['best']['number']})\"\n"
            f"seeds: 3\nbaseline: reference\nentries:\n"
            f"  - {{label: reference, method: \"the spec's own weights\", spec: {json.dumps(spec)}}}\n"
            f"  - {{label: tuned, method: \"kdgraph tune {res['study']}\", spec: {json.dumps(spec)}, set: {sets}}}\n")


def _plots(study: Any, out: Path, n_params: int) -> dict[str, str]:
    """The pictures Optuna draws; each one that cannot be drawn (too few trials) is named with the reason."""
    import matplotlib
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "unique value length is less than 2" and the like
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    wanted = {"history": ovm.plot_optimization_history, "intermediate": ovm.plot_intermediate_values,
              "slice": ovm.plot_slice, "importance": ovm.plot_param_importances}
    if n_params >= 2:
        wanted["contour"] = ovm.plot_contour
    made = {}
    import warnings

    for name, fn in wanted.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(max(6.4, fig.get_size_inches()[0]), 4.8)
            fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
            made[name] = str(out / f"{name}.png")
        except Exception as e:  # noqa: BLE001 - e.g. importance with fewer than 2 finished trials
            made[name] = f"not drawn: {type(e).__name__}: {e}"
        finally:
            plt.close("all")
    return made


def write_all(res: TuneResult, study: Any, out: Path, n_params: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tsv, md = _table(res["trials"])
    (out / "trials.tsv").write_text(tsv)
    (out / "trials.md").write_text(md)
    if res.get("best"):
        (out / "best_set.txt").write_text("".join(f"--set {shlex.quote(s)}\n" for s in res["best"]["set"]))
        (out / "tuned_suite.yaml").write_text(_suite(res, out))
    res["pictures"] = _plots(study, out, n_params)
    (out / "best.json").write_text(json.dumps(dict(res), indent=2, default=str))
