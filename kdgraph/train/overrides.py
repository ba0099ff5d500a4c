"""``--set key=value``: change a spec from the command line without editing the file.

Keys are dotted paths into the spec; list items by index, stages also by name, ``*`` for every
item; values are YAML (``1``, ``0.05``, ``bf16``, ``[10, 20]``, ``null``, ``{type: crd}``)::

    --set stages.main.epochs=2 --set runtime.amp=bf16 --set data.train_subset=5000
    --set 'stages.*.batch_size=64' --set stages.0.optimizer.lr=0.05

The result is validated again, so a wrong key or value is a SpecError naming it.
"""
from __future__ import annotations

from typing import Any, Iterable

import yaml

from ..errors import SpecError, did_you_mean
from ..spec import Spec, load_spec, validate_spec


def _set(node: Any, keys: list[str], value: Any, full: str) -> None:
    key, rest = keys[0], keys[1:]
    if isinstance(node, list):
        if key == "*":
            targets = list(range(len(node)))
        elif key.lstrip("-").isdigit():
            i = int(key)
            if not -len(node) <= i < len(node):
                raise SpecError(f"--set {full}: index {i} out of range (the list has {len(node)} items)")
            targets = [i]
        else:
            named = [i for i, item in enumerate(node) if isinstance(item, dict) and item.get("name") == key]
            if not named:
                names = [str(item.get("name")) for item in node if isinstance(item, dict) and "name" in item]
                raise SpecError(f"--set {full}: no item named {key!r}.{did_you_mean(key, names)} "
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
    raise SpecError(f"--set {full}: {key!r} goes inside a value that is not a mapping or a list")


def apply_overrides(spec: Spec, assignments: Iterable[str]) -> Spec:
    """A new spec with each ``key=value`` applied (see the module docstring)."""
    assignments = list(assignments)
    if not assignments:
        return spec
    data = spec.model_dump(mode="json")
    for a in assignments:
        key, sep, raw = a.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(f"--set {a!r}: write KEY=VALUE, e.g. --set stages.main.epochs=2")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise SpecError(f"--set {a}: the value is not valid YAML ({e})") from None
        _set(data, key.split("."), value, a)
    return validate_spec(data, "spec after --set")


def load_with_overrides(path: Any, assignments: Iterable[str] = (), data_root: str | None = None) -> Spec:
    spec = apply_overrides(load_spec(path), assignments)
    if data_root is not None:
        spec = spec.model_copy(deep=True)
        spec.data.root = data_root
    return spec
