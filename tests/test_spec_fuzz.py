"""Fuzz the spec: hostile mutations of every shipped spec (tests/spec_mutations.py) must end in a clear
KDGraphError naming the field (or, for a valid mutation, still compile); nothing else escapes, nothing hangs,
and the CLI answers them with exit 2 and one paragraph on stderr.

Load-time mutations (schema, YAML, names, unknown keys, type swaps) are cheap: hundreds of them. Mutations
checked at compile time (wiring, method arguments, sizes) and valid ones compile at 32 x 32 px: a dozen.
``scripts/fuzz_report.py`` runs every mutation over every spec and prints the outcome table.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import kdgraph
import spec_mutations as sm

BASES = sm.load_bases()
LOAD = [m for m in sm.MUTATIONS if not (m.compile or m.valid)]
COMPILE = [m for m in sm.MUTATIONS if m.compile or m.valid]


def fuzz(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _check(mutation: sm.Mutation, base: sm.Base, rng: random.Random) -> None:
    source = mutation.fn(base, rng)
    assume(source is not None)
    case = sm.Case(mutation, base, source)
    with tempfile.TemporaryDirectory() as tmp:
        outcome, msg = sm.run_case(case, Path(tmp), timeout=5.0, compile_timeout=60.0)
    assert outcome in sm.GOOD, f"{mutation.category} / {mutation.name} on {base.path.name}: {outcome}: {msg}"


def test_every_category_and_spec_is_covered():
    assert {m.category for m in sm.MUTATIONS} == set(sm.CATEGORIES)
    assert len(BASES) == len(list((sm.ROOT / "specs").glob("*.yaml"))) >= 10
    n_load = sum(len(sm.cases_for(m, BASES)) for m in LOAD)
    assert n_load >= 500, n_load  # hundreds of distinct load-time cases for the generated tests to draw from


@fuzz(400)
@given(base=st.sampled_from(BASES), mutation=st.sampled_from(LOAD), rng=st.randoms(use_true_random=False))
def test_load_time_mutations_are_clear_errors(base, mutation, rng):
    _check(mutation, base, rng)


@fuzz(14)
@given(base=st.sampled_from(BASES), mutation=st.sampled_from(COMPILE), rng=st.randoms(use_true_random=False))
def test_compile_time_mutations_are_clear_errors_and_valid_ones_compile(base, mutation, rng):
    _check(mutation, base, rng)


# one case per category and then some, each on a different spec: the CLI's exit code and stderr. Run one after
# the other (each process imports torch); the per-process limit is generous, hangs are caught in-process above.
CLI_SAMPLE = ["bool epochs", "nan weight", "huge size", "duplicate stages key", "alias bomb", "deep list nesting",
              "non-UTF-8 bytes", "name '../escape'", "train: []"]


def test_cli_answers_mutated_specs_with_exit_2_and_one_paragraph(tmp_path):
    by_name = {m.name: m for m in sm.MUTATIONS}
    env = {**os.environ, "PYTHONPATH": str(sm.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    jobs = []
    for i, name in enumerate(CLI_SAMPLE):
        cases = sm.cases_for(by_name[name], BASES)
        case = cases[i % len(cases)]
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        jobs.append((name, sm.materialize(case, folder)))
    for start in range(0, len(jobs), 3):  # three processes at a time: each mostly waits on importing torch
        procs = [(name, subprocess.Popen([sys.executable, "-m", "kdgraph", "compile", path], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, env=env))
                 for name, path in jobs[start:start + 3]]
        for name, proc in procs:
            try:
                out, err = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail(f"{name}: kdgraph compile hangs")
            assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{err}"
            assert "Traceback" not in err and "Traceback" not in out, f"{name}: {err}"
            text = err.strip()
            assert text.startswith("error:") and "\n\n" not in text, f"{name}: not one paragraph:\n{err}"
            assert sm.FIELD_RE.search(text) or "UTF-8" in text, f"{name}: names no field: {text}"


TINY = {"name": "tiny", "input": {"channels": 1, "size": [16, 16], "num_classes": 10},
        "teacher": {"model": "kdgraph.zoo:tiny_cnn"}, "student": {"model": "kdgraph.zoo:tiny_cnn"},
        "stages": [{"name": "main", "optimizer": {"lr": 0.1}, "losses": [{"type": "cross_entropy"}]}]}


def test_a_size_the_network_cannot_run_is_one_clean_error_without_torch_traceback(capfd):
    from kdgraph.distiller import Distiller
    from kdgraph.errors import TraceError

    spec = kdgraph.load_spec(TINY)
    spec.input.size = (0, 0)  # as `kdgraph compile --input-size 0 0` sets it, past the schema
    with pytest.raises(TraceError, match=r"fails on an input of shape \[2, 1, 0, 0\] at \w+") as err:
        Distiller.from_spec(spec)
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert "torch/" not in str(err.value) and "\n" not in str(err.value)


def test_spec_errors_carry_the_yaml_line_at_compile_time():
    text = yaml.safe_dump({**TINY, "stages": [{"name": "main", "optimizer": {"lr": 0.1},
                                                "losses": [{"type": "cross_entropy", "args": {"smoothing": 0.1}}]}]},
                          sort_keys=False)
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "smoothing" in s)
    with pytest.raises(kdgraph.SpecError) as err:
        kdgraph.compile(text)
    msg = str(err.value)
    assert msg.startswith(f"stages[0].losses[0].args.smoothing (line {line}): ") and "label_smoothing" in msg
