"""The tap grammar: how a spec names a value of the teacher, the student, an adapter or the batch.

``teacher:layer4.1.relu``, ``student:layer1.0/add``, ``teacher:fc@input``, ``adapter:abf.2``, ``batch:index``;
:func:`parse_tap` turns the text into a :class:`Tap` or raises a :class:`SpecError` that shows the grammar.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

from pydantic import Field


TAP_GRAMMAR = """\
tap      := network ":" target | "adapter:" NAME ["." INDEX] | "batch:" NAME
network  := "teacher" | "student"
target   := "@output" | "@input"                      the whole network's output (logits) / input
          | MODPATH ["#" CALL] ["@output" | "@input"]  a module call (default: its last call, output)
          | [MODPATH] "/" OP                          a functional op inside MODPATH's forward
MODPATH  := PART ("." PART)*   PART := identifier | integer (negative counts from the end)
OP       := the op's fx name in that scope: add, add_1, flatten, ...
examples: teacher:layer4   student:layer4.-1   student:fc@input   teacher:layer1.0/add
          student:layer1.0.relu#0   adapter:paraphraser   adapter:abf4.1   batch:targets"""

_IDENT = r"[A-Za-z_]\w*"
_PART = rf"(?:{_IDENT}|-?\d+)"
_MODPATH = rf"{_PART}(?:\.{_PART})*"
_NET_RE = re.compile(r"^(teacher|student):(.*)$")
_OP_RE = re.compile(rf"^(?P<path>{_MODPATH})?/(?P<op>{_IDENT})$")
_MOD_RE = re.compile(rf"^(?P<path>{_MODPATH})(?:#(?P<call>\d+))?(?:@(?P<io>input|output))?$")
_WHOLE_RE = re.compile(r"^@(?P<io>input|output)$")
_ADAPTER_RE = re.compile(rf"^adapter:(?P<name>{_IDENT})(?:\.(?P<index>\d+))?$")
_BATCH_RE = re.compile(rf"^batch:(?P<name>{_IDENT})$")


@dataclass(frozen=True)
class Tap:
    """A parsed tap. ``text`` is what the user wrote; every error quotes it."""

    text: str
    source: Literal["teacher", "student", "adapter", "batch"]
    path: str = ""  # module path ("" = whole network), adapter name or batch key
    io: Literal["input", "output"] = "output"
    call: Optional[int] = None  # which call of a module that runs several times; None = last
    op: Optional[str] = None  # functional op name inside ``path``
    index: Optional[int] = None  # element of an adapter's tuple output

    @property
    def network(self) -> Optional[str]:
        return self.source if self.source in ("teacher", "student") else None

    def __str__(self) -> str:
        return self.text


def parse_tap(text: str) -> Tap:
    """Parse one tap string; raise ``ValueError`` (turned into a SpecError) if it fits no rule."""
    if not isinstance(text, str):
        raise ValueError(f"a tap is a string, got {type(text).__name__}")
    s = text.strip()
    m = _NET_RE.match(s)
    if m:
        net, target = m.group(1), m.group(2)
        if w := _WHOLE_RE.match(target):
            return Tap(s, net, "", io=w.group("io"))
        if o := _OP_RE.match(target):
            return Tap(s, net, o.group("path") or "", op=o.group("op"))
        if mm := _MOD_RE.match(target):
            call = mm.group("call")
            return Tap(s, net, mm.group("path"), io=mm.group("io") or "output",
                       call=int(call) if call is not None else None)
    elif a := _ADAPTER_RE.match(s):
        idx = a.group("index")
        return Tap(s, "adapter", a.group("name"), index=int(idx) if idx is not None else None)
    elif b := _BATCH_RE.match(s):
        return Tap(s, "batch", b.group("name"))
    raise ValueError(f"{text!r} is not a tap. The grammar:\n{TAP_GRAMMAR}")


TapStr = Annotated[str, Field(description="a tap, see kdgraph.spec.TAP_GRAMMAR")]
