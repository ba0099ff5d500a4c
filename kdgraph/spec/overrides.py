"""Overrides: change a spec without editing its file, from Python or with ``--set`` on the command line.

    spec = kdgraph.load_spec("specs/crd_resnet18.yaml",
                             overrides=["stages.main.losses.crd.args.num_samples=50", "input.size=[32, 32]"])

Keys are dotted paths into the spec; list items by index or by name (``stages.main.losses.crd`` is
the loss named ``crd`` of the stage named ``main``), ``*`` for every item; values are YAML (``1``,
``0.05``, ``bf16``, ``[10, 20]``, ``null``, ``{type: crd}``)::

    --set stages.main.epochs=2 --set runtime.amp=bf16 --set data.train_subset=5000
    --set 'stages.*.batch_size=64' --set stages.0.optimizer.lr=0.05

The result is validated again, so a wrong key or value is a SpecError naming it. The CLI's
``--set`` (:mod:`kdgraph.train.overrides`) and ``load_spec(..., overrides=...)`` share this code,
so their grammar and errors are the same.
"""
from __future__ import annotations

from typing import Any, Iterable

import yaml

from ..errors import SpecError, did_you_mean
from .schema import Spec
from .validate import validate_spec


def _set(node: Any, keys: list[str], value: Any, full: str) -> None:
    key, rest = keys[0], keys[1:]
    if isinstance(node, list):
        if key == "*":
            targets = list(range(len(node)))
        elif key.lstrip("-").isdigit():
            i = int(key)
            if not -len(node) <= i < len(node):
                raise SpecError(f"{full}: index {i} out of range (the list has {len(node)} items)")
            targets = [i]
        else:
            named = [i for i, item in enumerate(node) if isinstance(item, dict) and item.get("name") == key]
            if not named:
                names = [str(item.get("name")) for item in node if isinstance(item, dict) and "name" in item]
                raise SpecError(f"{full}: no item named {key!r}.{did_you_mean(key, names)} "
                                f"Items: {', '.join(names) or 'by index 0..' + str(len(node) - 1)}")
            targets = named
        for i in targets:
            if rest:
                _set(node[i], rest, value, full)
            else:
                node[i] = value
        return
    if isinstance(node, dict):
        if not rest:
            node[key] = value
            return
        if node.get(key) is None:
            node[key] = {}
        _set(node[key], rest, value, full)
        return
    raise SpecError(f"{full}: {key!r} goes inside a value that is not a mapping or a list")


def apply_overrides(spec: Spec, assignments: Iterable[str], label: str = "override") -> Spec:
    """A new spec with each ``key=value`` applied (see the module docstring); ``spec`` is not changed.

    ``label`` starts every error message (the CLI passes ``--set``)."""
    if isinstance(assignments, str):
        raise SpecError(f"overrides: pass a list of KEY=VALUE strings, e.g. [{assignments!r}], not one string")
    assignments = list(assignments)
    if not assignments:
        return spec
    data = spec.model_dump(mode="json")
    for a in assignments:
        key, sep, raw = a.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(f"{label} {a!r}: write KEY=VALUE, e.g. stages.main.epochs=2")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise SpecError(f"{label} {a}: the value is not valid YAML ({e})") from None
        _set(data, key.split("."), value, f"{label} {a}")
    return validate_spec(data, f"spec after {label}")


__all__ = ["apply_overrides"]
