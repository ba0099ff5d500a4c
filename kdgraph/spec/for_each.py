"""``for_each``: one adapter or loss entry written once, expanded at load time into one ordinary entry per index.

A layer map between networks of different depth (teacher layer ``2i + 1`` -> student layer ``i``, each through its
own learned projection) is a list of ordinary adapters and losses; ``for_each`` writes them once::

    adapters:
      proj_{i}:
        for_each: {i: [0, 1]}
        type: connector
        inputs: {x: "student:model.layers.{i}"}
        match: "teacher:model.layers.{2*i+1}"
        args: {layer: linear, flatten: false}
    stages:
      - name: main
        train: [student, "proj_{i}"]           # the template's name stands for all its expansions
        losses:
          - {name: hidden, type: mse, for_each: {i: [0, 1]},
             inputs: {student: "adapter:proj_{i}", teacher: "teacher:model.layers.{2*i+1}"}}

expands into adapters ``proj_0``, ``proj_1`` and losses ``hidden_0``, ``hidden_1`` before validation, so each
expansion meets every check an entry written by hand meets (a missing layer: the tap's did-you-mean), and the
compiler, the report and ``--set stages.main.losses.hidden_1.weight=2`` see plain entries.

Rules: ``for_each`` maps variable names to equally long lists of integers (zipped, like Python's ``zip``; at most
:data:`MAX_EXPANSIONS` entries). ``{expr}`` in any string of the entry (taps, ``match``, ``name``, string args) is
replaced by the value of ``expr``: an integer expression over the variables with ``+ - * // %`` and parentheses
(evaluated on the syntax tree, never by ``eval``). A loss's name (default: its type) and an adapter's key without a
placeholder get the values appended (``hidden_0``); with one (``proj_{i}``) they are expanded like the rest.
Errors name the entry's field path and YAML line.
"""
from __future__ import annotations

import ast
import re
from typing import Any, Optional

from ..errors import SpecError
from .location import fmt_loc

__all__ = ["expand_for_each", "MAX_EXPANSIONS"]

MAX_EXPANSIONS = 256
_MAX_INT = 10 ** 9
_PLACEHOLDER = re.compile(r"\{([^{}]{1,100})\}")
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}


class _Bad(ValueError):
    pass


def _eval(node: ast.AST, env: dict[str, int]) -> int:
    if isinstance(node, ast.Expression):
        return _eval(node.body, env)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        value = node.value
    elif isinstance(node, ast.Name):
        if node.id not in env:
            raise _Bad(f"{node.id!r} is not a for_each variable (defined: {', '.join(env)})")
        value = env[node.id]
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = -_eval(node.operand, env)
    elif isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        a, b = _eval(node.left, env), _eval(node.right, env)
        if isinstance(node.op, (ast.FloorDiv, ast.Mod)) and b == 0:
            raise _Bad("division by zero")
        value = _OPS[type(node.op)](a, b)
    else:
        raise _Bad("only integers, for_each variables, + - * // % and parentheses are allowed")
    if abs(value) > _MAX_INT:
        raise _Bad(f"a value beyond +-{_MAX_INT:,}")
    return value


def _fill(text: str, env: dict[str, int]) -> str:
    def one(m: re.Match) -> str:
        try:
            return str(_eval(ast.parse(m.group(1).strip(), mode="eval"), env))
        except SyntaxError:
            raise _Bad(f"{{{m.group(1)}}} is not an integer expression") from None
        except _Bad as e:
            raise _Bad(f"{{{m.group(1)}}}: {e}") from None

    return _PLACEHOLDER.sub(one, text)


def _substitute(value: Any, env: dict[str, int]) -> Any:
    if isinstance(value, str):
        return _fill(value, env)
    if isinstance(value, dict):
        return {k: _substitute(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, env) for v in value]
    return value


def _envs(spec: Any, where: str) -> list[dict[str, int]]:
    if not isinstance(spec, dict) or not spec:
        raise _Bad("for_each maps variable names to lists of integers, e.g. {i: [0, 1, 2]}")
    lengths = set()
    for name, values in spec.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_]\w{0,30}", name):
            raise _Bad(f"variable {name!r} must be an identifier")
        if (not isinstance(values, list) or not values
                or not all(type(v) is int and abs(v) <= _MAX_INT for v in values)):
            raise _Bad(f"{name}: a non-empty list of integers, got {values!r}")
        lengths.add(len(values))
    if len(lengths) > 1:
        raise _Bad(f"the lists have different lengths ({', '.join(f'{k}: {len(v)}' for k, v in spec.items())}); "
                   f"they are zipped, so they must be equally long")
    n = lengths.pop()
    if n > MAX_EXPANSIONS:
        raise _Bad(f"{n} expansions; at most {MAX_EXPANSIONS}")
    return [{k: v[j] for k, v in spec.items()} for j in range(n)]


def _expand(entry: dict, name: str, where: str) -> list[tuple[str, dict]]:
    """``(name, entry)`` for each index of ``entry``'s ``for_each``."""
    body = {k: v for k, v in entry.items() if k != "for_each"}
    try:
        envs = _envs(entry["for_each"], where)
        out = []
        for env in envs:
            new = name if _PLACEHOLDER.search(name) else f"{name}_{'_'.join(str(v) for v in env.values())}"
            out.append((_fill(new, env).replace("-", "m"), _substitute(body, env)))
    except _Bad as e:
        raise SpecError(f"{where}: {e}") from None
    return out


def _remap(lines: dict, old: tuple, new: tuple, out: dict) -> None:
    for key, line in lines.items():
        if key[:len(old)] == old:
            out.setdefault(new + key[len(old):], line)


def expand_for_each(data: Any, lines: Optional[dict] = None, source: str = "<spec>") -> tuple[Any, dict]:
    """A copy of a parsed spec with every ``for_each`` entry expanded, and its YAML line map moved along."""
    lines = dict(lines or {})
    if not isinstance(data, dict):
        return data, lines

    def at(*loc) -> str:
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        return f"{source}: {fmt_loc(loc)}" + (f" (line {line})" if line else "")

    new_lines: dict = {}
    templates: dict[str, list[str]] = {}
    data = dict(data)
    adapters_done = False
    if isinstance(data.get("adapters"), dict) and any(isinstance(a, dict) and "for_each" in a
                                                      for a in data["adapters"].values()):
        adapters: dict = {}
        for key, ad in data["adapters"].items():
            items = _expand(ad, str(key), at("adapters", key, "for_each")) if isinstance(ad, dict) \
                and "for_each" in ad else [(key, ad)]
            if len(items) > 1 or items[0][0] != key:
                templates[str(key)] = [k for k, _ in items]
            for k, v in items:
                if k in adapters:
                    raise SpecError(f"{at('adapters', key)}: the expansion {k!r} repeats an adapter name")
                adapters[k] = v
                _remap(lines, ("adapters", key), ("adapters", k), new_lines)
        data["adapters"] = adapters
        adapters_done = True
    if isinstance(data.get("stages"), list):
        stages = []
        for si, st in enumerate(data["stages"]):
            if isinstance(st, dict) and isinstance(st.get("losses"), list):
                st = dict(st)
                losses = []
                for li, ls in enumerate(st["losses"]):
                    if isinstance(ls, dict) and "for_each" in ls:
                        name = str(ls.get("name") or ls.get("type") or "loss")
                        items = [(n, {**v, "name": n}) for n, v in
                                 _expand(ls, name, at("stages", si, "losses", li, "for_each"))]
                    else:
                        items = [(None, ls)]
                    for _, v in items:
                        _remap(lines, ("stages", si, "losses", li), ("stages", si, "losses", len(losses)), new_lines)
                        losses.append(v)
                st["losses"] = losses
            if isinstance(st, dict) and templates and isinstance(st.get("train"), list):
                st = {**st, "train": [x for t in st["train"]
                                      for x in (templates.get(t, [t]) if isinstance(t, str) else [t])]}
            stages.append(st)
        data["stages"] = stages
    for key, line in lines.items():
        if key[:1] == ("adapters",) and len(key) > 1 and adapters_done:
            continue
        if key[:1] == ("stages",) and len(key) > 3 and key[2] == "losses":
            continue
        new_lines.setdefault(key, line)
    return data, new_lines
