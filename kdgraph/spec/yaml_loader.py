"""Reading a spec's YAML safely: no tags, no aliases, no duplicate keys, bounded nesting and size, and the
line of every field (for error messages).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import yaml

from ..errors import SpecError


MAX_DEPTH = 64  # nesting of YAML mappings / lists
MAX_SPEC_BYTES = 4 * 2 ** 20


class _Refused(Exception):
    """A YAML construct a spec may not use, at ``line``."""

    def __init__(self, line: int, msg: str):
        super().__init__(msg)
        self.line, self.msg = line, msg


class SpecLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, stricter: no duplicate keys, no anchors / aliases, nesting at most MAX_DEPTH.

    A duplicate key would silently replace the first (a second ``stages:`` drops the first list); aliases make
    exponentially large (an alias bomb) or recursive values; deep nesting exhausts Python's stack.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # noqa: D401 - PyYAML's signature
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Refused(event.start_mark.line + 1,
                           f"YAML anchors and aliases (&{event.anchor} / *{event.anchor}) are not allowed in a spec; "
                           f"write the value out where it is used")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(event.start_mark.line + 1,
                               f"the YAML nests deeper than {MAX_DEPTH} levels; a spec needs a handful")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                hash(key)
            except TypeError:
                raise _Refused(line, f"a mapping key must be a plain name, got a {type(key).__name__}") from None
            if key in seen:
                raise _Refused(line, f"duplicate key {key!r} (first at line {seen[key]}); each key may appear once "
                                     f"in a mapping (YAML would silently keep only the last one)")
            seen[key] = line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, origin: str = "<string>") -> tuple[Any, dict[tuple, int]]:
    """Parse spec text with :class:`SpecLoader`: (data, field path -> 1-based YAML line)."""
    loader = None
    try:
        loader = SpecLoader(text)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.reader.ReaderError as e:
        line = text[:e.position].count("\n") + 1
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise SpecError(f"{origin} (line {line}): character U+{code:04X} is not allowed in YAML text "
                        f"(control characters such as NUL are not); remove it") from None
    except _Refused as e:
        raise SpecError(f"{origin} (line {e.line}): {e.msg}.") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{origin}: not valid YAML: {e}") from None
    except RecursionError:
        raise SpecError(f"{origin}: the YAML nests too deeply to read; a spec needs a handful of levels") from None
    finally:
        if loader is not None:
            loader.dispose()
    lines: dict[tuple, int] = {}

    def walk(n, path: tuple) -> None:
        lines[path] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                lines[path + (k.value,)] = k.start_mark.line + 1
                walk(v, path + (k.value,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, path + (i,))

    if node is not None:
        walk(node, ())
    return data, lines


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each field path (tuple of keys / indices) to its 1-based YAML line."""
    try:
        return parse_yaml(text)[1]
    except SpecError:
        return {}


def _non_finite(data: Any, loc: tuple = ()) -> Optional[tuple]:
    """The path of the first NaN / inf number in ``data`` (YAML .nan / .inf), or None."""
    if isinstance(data, float) and not math.isfinite(data):
        return loc
    if isinstance(data, dict):
        items: Any = data.items()
    elif isinstance(data, (list, tuple)):
        items = enumerate(data)
    else:
        return None
    for k, v in items:
        found = _non_finite(v, loc + (k,))
        if found is not None:
            return found
    return None
