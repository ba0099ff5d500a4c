"""Hostile mutations of the shipped specs, and the runner that classifies what kdgraph does with each.

Shared by ``tests/test_spec_fuzz.py`` (hypothesis draws spec, mutation and the mutation's random choices) and
``scripts/fuzz_report.py`` (enumerates every mutation over the specs and prints outcome counts per category).
It uses only ``kdgraph.load_spec``, ``kdgraph.compile`` and ``kdgraph.errors.KDGraphError``, so the same file
runs against any version of kdgraph (the report compares before / after a change).

A mutation is ``(category, name, valid, compile, fn)``: ``fn(base, rng) -> Source | None`` builds the input
from one shipped spec (``None`` when it does not apply to that spec). ``compile`` mutations are compiled at a
small input size (wiring, method arguments, sizes); the others are loaded only (schema and YAML), which is
cheap. A valid mutation is always compiled: it must still compile.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import random
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))

CATEGORIES = ("numbers", "yaml", "names", "wiring", "unknown_keys", "type_swaps")
OUTCOMES = ("clear_error", "accepted_valid", "accepted_invalid", "rejected_valid", "unclear_error",
            "escaped", "printed_traceback", "hang")
GOOD = {"clear_error", "accepted_valid"}

# a message "names a field" when it names a spec field path, a YAML line or the file it read
FIELD_RE = re.compile(r"(\b(version|name|description|input|teacher|student|leaf_modules|adapters|stages|init_from|"
                      r"data|runtime|reference)\b|line \d+|\(top level\))")
SMALL = 32  # compile-time cases run at SMALL x SMALL (the shipped ImageNet specs are 224 px)


@dataclass
class Base:
    """One shipped spec: its file, text and parsed data."""

    path: Path
    text: str
    data: dict


@dataclass
class Source:
    """What a case hands to kdgraph: ``kind`` is dict (dumped to a file), text / bytes (written to a file),
    string (passed as the spec text itself) or dir (a folder named like a spec)."""

    kind: str
    payload: Any = None
    expect: Optional[str] = None  # a substring the error must contain (default: FIELD_RE)


@dataclass
class Mutation:
    category: str
    name: str
    valid: bool
    compile: bool
    fn: Callable[[Base, random.Random], Optional[Source]]


@dataclass
class Case:
    mutation: Mutation
    base: Base
    source: Source


def load_bases() -> list[Base]:
    return [Base(p, p.read_text(), yaml.safe_load(p.read_text())) for p in SPECS]


def small(data: dict) -> dict:
    """A copy of a spec's data at SMALL px with CRD's memory small: cheap to compile, same graph."""
    d = copy.deepcopy(data)
    size = d.setdefault("input", {}).get("size", [224, 224])
    if max(size) > SMALL:
        d["input"]["size"] = [SMALL, SMALL]
    for stage in d["stages"]:
        for loss in stage["losses"]:
            if loss["type"] == "crd":
                loss.setdefault("args", {})["num_samples"] = 64
    return d


# --------------------------------------------------------------------------------------------
# helpers for the mutations
# --------------------------------------------------------------------------------------------


def _stage(d: dict, rng: random.Random) -> dict:
    return rng.choice(d["stages"])


def _loss(d: dict, rng: random.Random) -> dict:
    return rng.choice(_stage(d, rng)["losses"])


def _losses_with(d: dict, pred) -> list[dict]:
    return [ls for st in d["stages"] for ls in st["losses"] if pred(ls)]


def _adapters_of(d: dict, *types: str) -> list[dict]:
    return [a for a in (d.get("adapters") or {}).values() if not types or a["type"] in types]


def _dict(fn: Callable[[dict, random.Random], Any], compile_: bool) -> Callable[[Base, random.Random], Optional[Source]]:
    """A mutation of the parsed data: ``fn`` edits a copy in place (returns False when not applicable)."""

    def build(base: Base, rng: random.Random) -> Optional[Source]:
        d = small(base.data) if compile_ else copy.deepcopy(base.data)
        if fn(d, rng) is False:
            return None
        return Source("dict", d)

    return build


def _set_arg(types: tuple[str, ...], key: str, value: Any, adapter: bool = False):
    def fn(d: dict, rng: random.Random):
        items = _adapters_of(d, *types) if adapter else _losses_with(d, lambda ls: ls["type"] in types)
        if not items:
            return False
        item = rng.choice(items)
        if item.get("args") is None:
            item["args"] = {}
        item["args"][key] = value
    return fn


def _optimizer(d: dict, rng: random.Random) -> dict:
    return _stage(d, rng)["optimizer"]


def _scheduler(d: dict, rng: random.Random) -> dict:
    st = _stage(d, rng)
    if not st.get("scheduler"):
        st["scheduler"] = {"type": "multistep", "milestones": [1], "gamma": 0.1}
    return st["scheduler"]


def _add_loss(loss: dict):
    def fn(d: dict, rng: random.Random):
        st = _stage(d, rng)
        st["losses"].append(copy.deepcopy(loss))
    return fn


def _bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["bomb_0: &b0 [" + ", ".join(['"x"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"bomb_{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _text(fn: Callable[[str, random.Random], Optional[str]], kind: str = "text"):
    def build(base: Base, rng: random.Random) -> Optional[Source]:
        out = fn(base.text, rng)
        return None if out is None else Source(kind, out)
    return build


def _name(value: Any):
    def fn(d: dict, rng: random.Random):
        d["name"] = value
    return fn


def _at(path: tuple, value: Any, compile_: bool = False):
    """Set ``d[path]`` (creating dicts on the way); a path part ``'*stage'`` picks a random stage."""
    def fn(d: dict, rng: random.Random):
        cur: Any = d
        for part in path[:-1]:
            if part == "*stage":
                cur = _stage(d, rng)
            elif part == "*loss":
                cur = rng.choice(cur["losses"])
            elif part == "*optimizer":
                cur = cur["optimizer"]
            else:
                if cur.get(part) is None:
                    cur[part] = {}
                cur = cur[part]
        cur[path[-1]] = copy.deepcopy(value)
    return _dict(fn, compile_)


def _nan_anywhere(d: dict, rng: random.Random):
    """Put NaN or inf into a random numeric leaf of the spec (kwargs, args, reference, optimizer ...)."""
    leaves: list[tuple[Any, Any]] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)):
                    leaves.append((x, k))
                walk(v)
        elif isinstance(x, list):
            for i, v in enumerate(x):
                if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)):
                    leaves.append((x, i))
                walk(v)

    walk(d)
    if not leaves:
        return False
    holder, key = rng.choice(leaves)
    holder[key] = rng.choice([math.nan, math.inf, -math.inf])


# --------------------------------------------------------------------------------------------
# the mutations
# --------------------------------------------------------------------------------------------

FROZEN_MSE = {"name": "frozen", "type": "mse", "inputs": {"student": "teacher:@output", "teacher": "teacher:@output"}}

MUTATIONS: list[Mutation] = [
    # ---- numbers
    Mutation("numbers", "bool epochs", False, False, _at(("*stage", "epochs"), True)),
    Mutation("numbers", "bool batch_size", False, False, _at(("*stage", "batch_size"), True)),
    Mutation("numbers", "bool num_classes", False, False, _at(("input", "num_classes"), True)),
    Mutation("numbers", "bool lr", False, False, _at(("*stage", "*optimizer", "lr"), True)),
    Mutation("numbers", "bool seed", False, False, _at(("runtime", "seed"), False)),
    Mutation("numbers", "inf lr", False, False, _at(("*stage", "*optimizer", "lr"), math.inf)),
    Mutation("numbers", "nan lr", False, False, _at(("*stage", "*optimizer", "lr"), math.nan)),
    Mutation("numbers", "nan weight", False, False, _at(("*stage", "*loss", "weight"), math.nan)),
    Mutation("numbers", "-inf weight", False, False, _at(("*stage", "*loss", "weight"), -math.inf)),
    Mutation("numbers", "nan anywhere", False, False, _dict(_nan_anywhere, False)),
    Mutation("numbers", "nan gamma", False, False, _dict(lambda d, r: _scheduler(d, r).update(gamma=math.nan), False)),
    Mutation("numbers", "negative gamma", False, False, _dict(lambda d, r: _scheduler(d, r).update(gamma=-0.5), False)),
    Mutation("numbers", "negative milestone", False, False,
             _dict(lambda d, r: _scheduler(d, r).update(milestones=[-5, 10]), False)),
    Mutation("numbers", "negative momentum", False, False, _at(("*stage", "*optimizer", "momentum"), -0.9)),
    Mutation("numbers", "zero epochs", False, False, _at(("*stage", "epochs"), 0)),
    Mutation("numbers", "negative num_classes", False, False, _at(("input", "num_classes"), -1)),
    Mutation("numbers", "zero channels", False, True, _at(("input", "channels"), 0, True)),
    Mutation("numbers", "zero size", False, True, _at(("input", "size"), [0, 0], True)),
    Mutation("numbers", "negative size", False, True, _at(("input", "size"), [-32, 32], True)),
    Mutation("numbers", "huge size", False, True, _at(("input", "size"), [1000000, 1000000], True)),
    Mutation("numbers", "inf temperature", False, True,
             _dict(_set_arg(("kd", "sskd_kd", "sskd_tf", "sskd_ss", "crd"), "temperature", math.inf), True)),
    Mutation("numbers", "negative temperature", False, True,
             _dict(_set_arg(("kd", "sskd_kd", "sskd_tf", "crd"), "temperature", -1.0), True)),
    Mutation("numbers", "bool temperature", False, True,
             _dict(_set_arg(("kd", "sskd_kd", "sskd_tf", "crd"), "temperature", True), True)),
    Mutation("numbers", "label_smoothing 2.0", False, True,
             _dict(_set_arg(("cross_entropy",), "label_smoothing", 2.0), True)),
    Mutation("numbers", "negative label_smoothing", False, True,
             _dict(_set_arg(("cross_entropy",), "label_smoothing", -0.1), True)),
    Mutation("numbers", "nan dist gamma", False, True, _dict(_set_arg(("dist",), "gamma", math.nan), True)),
    Mutation("numbers", "ft rate 0", False, True, _dict(_set_arg(("ft_encoder",), "rate", 0, adapter=True), True)),
    Mutation("numbers", "abf mid_channels -512", False, True,
             _dict(_set_arg(("abf",), "mid_channels", -512, adapter=True), True)),
    Mutation("numbers", "crd_head feature_dim 0", False, True,
             _dict(_set_arg(("crd_head",), "feature_dim", 0, adapter=True), True)),
    Mutation("numbers", "hcl output_sizes [0]", False, True, _dict(_set_arg(("hcl",), "output_sizes", [0]), True)),
    Mutation("numbers", "ft p 0", False, True, _dict(_set_arg(("ft",), "p", 0), True)),
    Mutation("numbers", "crd momentum 1.5", False, True, _dict(_set_arg(("crd",), "momentum", 1.5), True)),
    Mutation("numbers", "valid lr", True, True, _at(("*stage", "*optimizer", "lr"), 0.05, True)),
    Mutation("numbers", "valid weight", True, True, _at(("*stage", "*loss", "weight"), 2.5, True)),
    Mutation("numbers", "valid label_smoothing", True, True,
             _dict(_set_arg(("cross_entropy",), "label_smoothing", 0.1), True)),
    # ---- YAML
    Mutation("yaml", "duplicate top-level key", False, False, _text(lambda t, r: t + "\nname: duplicate\n")),
    Mutation("yaml", "duplicate stages key", False, False, _text(
        lambda t, r: t + "\nstages:\n  - {name: extra, optimizer: {lr: 0.1}, losses: [{type: cross_entropy}]}\n")),
    Mutation("yaml", "duplicate nested key", False, False, _text(
        lambda t, r: t.replace("input: {channels:", "input: {channels: 3, channels:", 1) if "input: {channels:" in t
        else None)),
    Mutation("yaml", "alias bomb", False, False, _text(lambda t, r: t + "\n" + _bomb())),
    Mutation("yaml", "recursive alias", False, False, _text(lambda t, r: t + "\nloop: &loop [*loop]\n")),
    Mutation("yaml", "anchor and alias", False, False, _text(
        lambda t, r: t + "\nx_defaults: &opt {type: sgd, lr: 0.1}\nx_copy: *opt\n")),
    Mutation("yaml", "deep list nesting", False, False,
             _text(lambda t, r: t + "\ndeep: " + "[" * 100000 + "]" * 100000 + "\n")),
    Mutation("yaml", "deep map nesting", False, False,
             _text(lambda t, r: t + "\ndeep: " + "{a: " * 100000 + "1" + "}" * 100000 + "\n")),
    Mutation("yaml", "non-UTF-8 bytes", False, False,
             lambda b, r: Source("bytes", b.text.encode() + b"\n# caf\xe9 \xff\xfe\n", expect="UTF-8")),
    Mutation("yaml", "directory named like a spec", False, False, lambda b, r: Source("dir", None, expect="directory")),
    Mutation("yaml", "one-line spec text (valid)", True, True, lambda b, r: Source("string", json.dumps(small(b.data)))),
    Mutation("yaml", "one-line spec text (invalid)", False, False, lambda b, r: Source(
        "string", json.dumps({**b.data, "stages": [{**b.data["stages"][0], "epochs": -1}]}))),
    Mutation("yaml", "empty text", False, False, lambda b, r: Source("string", "", expect="spec")),
    Mutation("yaml", "list at top level", False, False, _text(lambda t, r: "- a\n- b\n")),
    Mutation("yaml", "tab indentation", False, False, _text(lambda t, r: t + "\nruntime:\n\tseed: 1\n")),
    Mutation("yaml", "python tag", False, False, _text(
        lambda t, r: t + "\nx: !!python/object/apply:os.system ['echo hi']\n")),
    Mutation("yaml", "NUL character", False, False, _text(lambda t, r: t + "\ndescription2: \"a\x00b\"\n")),
    Mutation("yaml", "unhashable key", False, False, _text(lambda t, r: t + "\n? [a, b]\n: c\n")),
    # ---- names
    *[Mutation("names", f"name {v!r}"[:40], False, False, _dict(_name(v), False))
      for v in ["../escape", "/etc/passwd", "a/b", "runs\\..\\x", ".hidden", "-rf", "x" * 300, "", "a..b",
                "with space", "tab\tname", "new\nline", "C:evil", "~home"]],
    Mutation("names", "valid name", True, True, _dict(_name("run-1.v2_x"), True)),
    # ---- wiring (compile time)
    Mutation("wiring", "loss with nothing trainable", False, True, _dict(_add_loss(FROZEN_MSE), True)),
    Mutation("wiring", "cross_entropy targets = feature map", False, True, _dict(_add_loss(
        {"name": "ce_feat", "type": "cross_entropy",
         "inputs": {"logits": "student:@output", "targets": "student:layer4"}}), True)),
    Mutation("wiring", "cross_entropy targets = teacher logits", False, True, _dict(_add_loss(
        {"name": "ce_teacher", "type": "cross_entropy", "inputs": {"targets": "teacher:@output"}}), True)),
    Mutation("wiring", "cross_entropy logits = feature map", False, True, _dict(_add_loss(
        {"name": "ce_map", "type": "cross_entropy", "inputs": {"logits": "student:layer4"}}), True)),
    Mutation("wiring", "unknown batch key", False, True, _dict(_add_loss(
        {"name": "ce_labels", "type": "cross_entropy", "inputs": {"targets": "batch:labels"}}), True)),
    Mutation("wiring", "unknown data wrapper", False, True,
             _at(("data", "wrapper"), {"type": "not_a_wrapper"}, True)),
    Mutation("wiring", "unknown data wrapper arg", False, True,
             _at(("data", "wrapper"), {"type": "crd", "args": {"bogus": 1}}, True)),
    Mutation("wiring", "bad data wrapper mode", False, True,
             _at(("data", "wrapper"), {"type": "crd", "args": {"mode": "fuzzy"}}, True)),
    Mutation("wiring", "train: []", False, False, _at(("*stage", "train"), [])),
    Mutation("wiring", "num_classes disagrees", False, True, _at(("input", "num_classes"), 7, True)),
    Mutation("wiring", "unknown loss type", False, True, _at(("*stage", "*loss", "type"), "kdd", True)),
    Mutation("wiring", "missing tap", False, True, _dict(_add_loss(
        {"name": "far", "type": "mse", "inputs": {"student": "student:layer9", "teacher": "teacher:layer4"}}), True)),
    Mutation("wiring", "unchanged (valid)", True, True, _dict(lambda d, r: None, True)),
    # ---- unknown keys
    Mutation("unknown_keys", "top-level key", False, False, _at(("epochs",), 3)),
    Mutation("unknown_keys", "stage key", False, False, _at(("*stage", "lr"), 0.1)),
    Mutation("unknown_keys", "loss key", False, False, _at(("*stage", "*loss", "temprature"), 2.0)),
    Mutation("unknown_keys", "optimizer key", False, False, _at(("*stage", "*optimizer", "beta1"), 0.9)),
    Mutation("unknown_keys", "input key", False, False, _at(("input", "height"), 32)),
    Mutation("unknown_keys", "loss arg", False, True, _at(("*stage", "*loss", "args"), {"temprature": 2.0}, True)),
    Mutation("unknown_keys", "adapter arg", False, True, _dict(_set_arg((), "bogus", 1, adapter=True), True)),
    Mutation("unknown_keys", "transform arg", False, True,
             _dict(lambda d, r: (st := [s for s in d["stages"] if s.get("transform")]) and
                   st[0]["transform"].update(args={"angle": 45}) or (None if st else False), True)),
    # ---- type swaps
    Mutation("type_swaps", "name: 123", False, False, _dict(_name(123), False)),
    Mutation("type_swaps", "stages: mapping", False, False, _dict(
        lambda d, r: d.update(stages={s["name"]: s for s in d["stages"]}), False)),
    Mutation("type_swaps", "losses: string", False, False, _at(("*stage", "losses"), "ce")),
    Mutation("type_swaps", "size: string", False, False, _at(("input", "size"), "32x32")),
    Mutation("type_swaps", "size: three numbers", False, False, _at(("input", "size"), [32, 32, 3])),
    Mutation("type_swaps", "lr: string", False, False, _at(("*stage", "*optimizer", "lr"), "fast")),
    Mutation("type_swaps", "weight: list", False, False, _at(("*stage", "*loss", "weight"), [1.0])),
    Mutation("type_swaps", "train: string", False, False, _at(("*stage", "train"), "student")),
    Mutation("type_swaps", "args: list", False, False, _at(("*stage", "*loss", "args"), [1, 2])),
    Mutation("type_swaps", "kwargs: string", False, False, _at(("student", "kwargs"), "x")),
    Mutation("type_swaps", "inputs: list", False, False, _at(("*stage", "*loss", "inputs"), ["student:@output"])),
    Mutation("type_swaps", "model: int", False, False, _at(("student", "model"), 5)),
    Mutation("type_swaps", "tap: int", False, False, _at(("*stage", "*loss", "inputs"), {"student": 5})),
    Mutation("type_swaps", "temperature: string", False, True,
             _dict(_set_arg(("kd", "sskd_kd", "sskd_tf", "crd"), "temperature", "hot"), True)),
    Mutation("type_swaps", "uses_bn: string", False, True,
             _dict(_set_arg(("ft_encoder", "ft_decoder", "ft_translator"), "uses_bn", "maybe", adapter=True), True)),
    Mutation("type_swaps", "output_sizes: int", False, True, _dict(_set_arg(("hcl",), "output_sizes", 4), True)),
]


def cases_for(mutation: Mutation, bases: list[Base], seed: int = 0) -> list[Case]:
    out = []
    for i, base in enumerate(bases):
        src = mutation.fn(base, random.Random(f"{seed}:{mutation.name}:{base.path.name}"))
        if src is not None:
            out.append(Case(mutation, base, src))
    return out


# --------------------------------------------------------------------------------------------
# running one case
# --------------------------------------------------------------------------------------------


class Hang(BaseException):
    """Raised by the alarm: the case ran past its time limit (BaseException: no `except Exception` eats it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def materialize(case: Case, folder: Path) -> Any:
    """Write the case's input under ``folder``; return what to pass to load_spec / compile."""
    src, stem = case.source, case.base.path.stem
    path = folder / f"{stem}.yaml"
    if src.kind == "dict":
        path.write_text(yaml.safe_dump(src.payload, sort_keys=False))
    elif src.kind == "text":
        path.write_text(src.payload)
    elif src.kind == "bytes":
        path.write_bytes(src.payload)
    elif src.kind == "dir":
        path.mkdir()
    elif src.kind == "string":
        return src.payload
    else:
        raise ValueError(src.kind)
    return str(path)


def run_case(case: Case, folder: Path, timeout: float = 5.0, compile_timeout: float = 60.0) -> tuple[str, str]:
    """Run one case; return (outcome, message). Outcomes: see OUTCOMES (GOOD ones are fine).

    ``timeout`` bounds a load-only case, ``compile_timeout`` one that compiles (two ResNets are traced).
    """
    import kdgraph
    from kdgraph.errors import KDGraphError

    source = materialize(case, folder)
    compile_ = case.mutation.compile or case.mutation.valid
    timeout = compile_timeout if compile_ else timeout
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), time_limit(timeout):
            if compile_:
                kdgraph.compile(source)
            else:
                kdgraph.load_spec(source)
    except Hang:
        return "hang", f"no answer within {timeout:.0f} s"
    except KDGraphError as e:
        msg = str(e)
        if "Traceback" in err.getvalue():
            return "printed_traceback", msg
        if case.mutation.valid:
            return "rejected_valid", msg
        wanted = case.source.expect
        named = (wanted in msg) if wanted else bool(FIELD_RE.search(msg))
        return ("clear_error" if named else "unclear_error"), msg
    except BaseException as e:  # noqa: BLE001 - anything else escaped kdgraph's error family
        return "escaped", f"{type(e).__name__}: {str(e)[:200]}"
    if "Traceback" in err.getvalue():
        return "printed_traceback", err.getvalue()[-300:]
    return ("accepted_valid" if case.mutation.valid else "accepted_invalid"), ""
