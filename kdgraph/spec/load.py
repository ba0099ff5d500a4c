"""``load_spec``: a spec from a YAML path, YAML text, a dict or a :class:`Spec`; relative paths resolved against
the spec file's folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from ..errors import SpecError
from .schema import Spec
from .validate import validate_spec
from .yaml_loader import MAX_SPEC_BYTES, parse_yaml


def _looks_like_path(source: str) -> bool:
    """Whether a string names a spec file (rather than being the spec's YAML text)."""
    if "\n" in source or len(source) > 4096:
        return False
    if source.endswith((".yaml", ".yml")):
        return True
    if not source.strip():
        return False
    try:
        return Path(source).exists()
    except (OSError, ValueError):  # "File name too long", an embedded NUL: spec text, not a path
        return False


def _read_spec_file(p: Path) -> str:
    try:
        if not p.exists():
            raise SpecError(f"spec file {str(p)!r} does not exist")
        if p.is_dir():
            raise SpecError(f"spec {str(p)!r} is a directory, not a YAML file; pass the spec file inside it")
        if p.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"spec file {str(p)!r} is {p.stat().st_size:,} bytes; a spec is a short YAML file "
                            f"(at most {MAX_SPEC_BYTES:,} bytes)")
        raw = p.read_bytes()
    except OSError as e:
        raise SpecError(f"spec file {str(p)!r} cannot be read: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise SpecError(f"spec file {str(p)!r} (line {line}) is not UTF-8 text: byte {raw[e.start]:#04x} at offset "
                        f"{e.start}; save the file as UTF-8") from None


def load_spec(source: str | Path | dict | Spec, overrides: Iterable[str] = ()) -> Spec:
    """Load a spec from a YAML path, a YAML string, a dict or a :class:`Spec` (returned as is).

    Relative paths inside the spec (``init_from``, local weight files, an ``hf:`` model's config folder,
    ``data.tokenizer``) written ``./...`` or ``../...`` are resolved against the
    spec file's folder. ``overrides``: ``KEY=VALUE`` strings applied after loading, with the
    grammar and errors of the CLI's ``--set`` (see :mod:`kdgraph.spec.overrides`), e.g.
    ``["stages.main.losses.crd.args.num_samples=50"]``; the result is a new, validated spec.
    """
    if overrides:
        from .overrides import apply_overrides

        return apply_overrides(load_spec(source), overrides)
    if isinstance(source, Spec):
        return source
    if isinstance(source, dict):
        return validate_spec(source)
    text: str
    origin = "<string>"
    base: Optional[Path] = None
    if isinstance(source, Path) or (isinstance(source, str) and _looks_like_path(source)):
        p = Path(source)
        text = _read_spec_file(p)
        origin = str(p)
        base = p.resolve().parent
    elif isinstance(source, str):
        text = source
        if len(text.encode("utf-8", "replace")) > MAX_SPEC_BYTES:
            raise SpecError(f"the spec text is {len(text):,} characters; a spec is a short YAML document "
                            f"(at most {MAX_SPEC_BYTES:,} bytes)")
    else:
        raise SpecError(f"a spec is a YAML file path, YAML text, a dict or a kdgraph.Spec, got {type(source).__name__}")
    data, lines = parse_yaml(text, origin)
    if data is None:
        raise SpecError(f"{origin}: the spec is empty; a spec is a YAML mapping with at least name, teacher, "
                        f"student and stages")
    spec = validate_spec(data, origin, lines=lines)
    if base is not None:
        spec = _resolve_paths(spec, base)
    return spec


def _resolve_paths(spec: Spec, base: Path) -> Spec:
    def fix(p: Optional[str]) -> Optional[str]:
        if p and (p.startswith("./") or p.startswith("../")):
            return str((base / p).resolve())
        return p

    spec.init_from = fix(spec.init_from)
    cache = spec.runtime.teacher_cache
    if cache and not Path(cache).expanduser().is_absolute():  # any relative folder: the spec file's
        spec.runtime.teacher_cache = str((base / Path(cache).expanduser()).resolve())
    for ref in (spec.teacher, spec.student):
        ref.weights = fix(ref.weights)
        ref.tokenizer = fix(ref.tokenizer)
        if ref.model.startswith("hf:") and isinstance(ref.kwargs.get("config"), str):  # a local config folder
            ref.kwargs["config"] = fix(ref.kwargs["config"])
        if isinstance(ref.kwargs.get("config"), dict) and isinstance(ref.kwargs["config"].get("gguf"), str):
            ref.kwargs["config"]["gguf"] = fix(ref.kwargs["config"]["gguf"])  # a GGUF file's metadata
    if spec.data.tokenizer:
        spec.data.tokenizer = fix(spec.data.tokenizer)
    for source in spec.data.text.sources if spec.data.text else ():
        source.path = fix(source.path)
    return spec
