"""``kdgraph export`` and ``kdgraph eval``: the student out of a checkpoint, and its accuracy.

The exported file is a plain ``state_dict`` of the student (contiguous CPU tensors, no prefixes),
so it loads with the network's own class::

    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load("student.pt", weights_only=True), strict=True)

Its content hash goes to ``student.pt.sha256`` beside it (see :mod:`kdgraph.models.weightio`). With
``-o student.safetensors`` it is written as safetensors (no code, a checked format; the hash is in its
metadata): ``model.load_state_dict(safetensors.torch.load_file("student.safetensors"), strict=True)``.

An ``hf:`` student (a transformers network) can also be written as a ``save_pretrained`` folder with ``hf=True``
(``kdgraph export CKPT -o DIR --hf``): config.json and model.safetensors, which
``AutoModelForSequenceClassification.from_pretrained(DIR)`` (or ``AutoModelForCausalLM``, ...) loads with no missing
or unexpected key. Tied weights stay tied (save_pretrained writes the shared tensor once). A causal LM also gets
its generation_config.json, ``use_cache`` back on (a spec turns it off for capture only), and the tokenizer of the
spec's ``data.tokenizer`` (a folder, or a GGUF file's tokenizer) when it exists here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import CheckpointError, KDGraphError, ModelError
from ..spec import Spec, validate_spec
from ..models.trust import ConsentError
from ..models.weightio import atomic_save, brief, load_file, save_safetensors
from ..models.weights import is_checkpoint, load_weights, resolve, state_dict_of
from .checkpoint import Checkpoint

__all__ = ["export_student", "evaluate_checkpoint"]


def _export_hf(ckpt: str | Path, out: str | Path, stored_spec: Optional[dict], sd: dict) -> dict[str, Any]:
    """The student as a save_pretrained folder, built from the checkpoint's spec (an hf: student)."""
    from ..models.hf_support import save_hf_folder
    from ..models import build_model

    if not stored_spec:
        raise CheckpointError(f"{ckpt}: --hf needs a kdgraph checkpoint (it holds the spec that says how the student "
                              f"is built); this file is a plain state_dict")
    spec = validate_spec(stored_spec, f"{ckpt} (its spec)")
    if not spec.student.model.startswith("hf:"):
        raise CheckpointError(f"{ckpt}: --hf writes a Hugging Face save_pretrained folder, but the student is "
                              f"{spec.student.model!r}, not an hf: model; export a .pt or .safetensors file instead")
    model = build_model(spec.student, "student")
    notes = []
    if callable(getattr(model, "can_generate", None)) and model.can_generate() and model.config.use_cache is False:
        model.config.use_cache = True  # a capture setting (torch.export of a causal LM), not the network's: generation
        model.generation_config.use_cache = True  # with the exported folder uses the key-value cache again
        notes.append("use_cache set back to true in config.json (the spec turned it off for capture only)")
    files = save_hf_folder(model, {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, out)
    tokenizer = getattr(spec.data, "tokenizer", None)
    if tokenizer:
        notes.append(_copy_tokenizer(tokenizer, out))
        files = sorted(p.name for p in Path(out).iterdir())
    n = sum(p.numel() for p in model.parameters())
    return {"out": str(out), "tensors": len(sd), "parameters": n, "model": spec.student.model, "verified": True,
            "files": files, "notes": notes}


def _copy_tokenizer(ref: str, out: str | Path) -> str:
    """The spec's ``data.tokenizer`` (a local folder, or a GGUF file's tokenizer: a path or ``pkg:PACKAGE/FILE.gguf``)
    saved into ``out`` beside the weights; a note for people."""
    from transformers import AutoTokenizer

    from ..models.gguf_support import is_gguf, resolve_local

    try:
        if is_gguf(ref):
            path = resolve_local(ref, "data.tokenizer")
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True,
                                                trust_remote_code=False)
        elif Path(ref).expanduser().is_dir():
            tok = AutoTokenizer.from_pretrained(str(Path(ref).expanduser()), local_files_only=True,
                                                trust_remote_code=False)
        else:
            return f"tokenizer not copied: the spec's data.tokenizer {ref!r} is not a folder on this machine"
    except ModelError as e:  # a pkg: reference whose package is not installed here, a missing file
        return f"tokenizer not copied: {e}"
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelError(f"data.tokenizer: {ref!r} cannot be read as a tokenizer ({e}); it was not copied") from None
    tok.save_pretrained(str(out))
    return f"tokenizer copied from {ref}"


def export_student(ckpt: str | Path, out: str | Path, verify: bool = True, hf: bool = False) -> dict[str, Any]:
    """Write the student's weights of ``ckpt`` (a kdgraph checkpoint, a plain state_dict, or a sharded checkpoint
    folder of :mod:`.sharded_checkpoint`, gathered) to ``out``.

    With ``verify``, the weights are loaded (strict) into a fresh student built from the spec the
    checkpoint holds. With ``hf``, ``out`` is a save_pretrained folder of the (hf:) student. Returns
    ``{"out", "tensors", "parameters", "model", "verified"}``.
    """
    from .sharded_checkpoint import is_sharded_checkpoint, read_student

    if is_sharded_checkpoint(ckpt):  # a sharded (FSDP) checkpoint folder: its shards gathered into one state_dict
        sd, extra = read_student(ckpt)
        stored_spec = extra.get("spec")
    else:
        obj = load_file(ckpt)
        stored_spec = Checkpoint.from_dict(obj, ckpt).spec if is_checkpoint(obj) else None
        sd = state_dict_of(obj, "student", str(ckpt))
    if hf:
        return _export_hf(ckpt, out, stored_spec, sd)
    model_name, verified = None, False
    if verify and stored_spec:
        from ..models import build_model

        spec = validate_spec(stored_spec, f"{ckpt} (its spec)")
        model_name = spec.student.model
        try:
            model = build_model(spec.student, "student")
        except ConsentError as e:  # the stored spec is as untrusted as any spec
            raise ConsentError(f"{ckpt} (its stored spec): {e} Or pass --no-verify to export without building "
                               f"the student.") from None
        except ModelError:
            model = None  # a user factory that is not importable here: nothing to check against
        if model is not None:
            try:
                model.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"{ckpt}: the student weights do not fit {spec.student.model}: "
                                      f"{brief(e)}") from None
            verified = True
    if str(out).endswith(".safetensors"):
        save_safetensors({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, out)
    else:
        atomic_save(sd, out)
    n = sum(v.numel() for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and "running_" not in k)
    return {"out": str(out), "tensors": len(sd), "parameters": n, "model": model_name, "verified": verified}


def evaluate_checkpoint(spec: Spec, ckpt: Optional[str], role: str = "student", data: Optional[str] = None,
                        device: Optional[str] = None, batch_size: Optional[int] = None) -> dict[str, Any]:
    """Top-1 / top-5 of the spec's student (weights from ``ckpt``) or teacher (weights the spec names,
    or the teacher in ``ckpt``) on the validation split. Works under torchrun (each image counted once)."""
    import torch.distributed as dist

    from ..models import build_model
    from .data import build_datasets, check_data
    from .distributed import setup, teardown
    from .evaluation import eval_task, evaluate_model, validation_loader

    if role not in ("student", "teacher"):
        raise KDGraphError(f"--model must be student or teacher, got {role!r}")
    spec = spec.model_copy(deep=True)
    root = data if data is not None else spec.data.root
    check_data(spec, root)
    owned = not dist.is_initialized()
    env = setup(device)
    try:
        bundle = build_datasets(spec, root, need_train=False)
        ref = getattr(spec, role)
        model = build_model(ref, role).to(env.device)
        source = None
        if ckpt:
            sd = state_dict_of(load_file(ckpt), role, str(ckpt))  # a checkpoint's student / teacher, or the file
            try:
                model.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"{ckpt}: weights do not fit the spec's {role} {ref.model}: "
                                      f"{brief(e)}") from None
            source = str(ckpt)
        else:
            resolve(spec, role, require=True)
            if not load_weights(model, ref, role):
                raise KDGraphError(f"no weights to evaluate: pass --ckpt, or name {role}.weights in the spec")
            source = ref.weights
        if spec.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loader = validation_loader(spec, bundle.val, env, batch_size)
        res = evaluate_model(model, loader, env, spec.runtime.amp, spec.runtime.channels_last, task=eval_task(spec))
        res.update(role=role, model=ref.model, weights=source, data=bundle.description, rank=env.rank)
        return res
    finally:
        if owned:
            teardown(env)
