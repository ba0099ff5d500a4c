"""``hf:CLASS`` model references: Hugging Face transformers networks, built from a local or inline config.

    student:
      model: "hf:AutoModelForSequenceClassification"
      kwargs: {config: {model_type: bert, hidden_size: 768, num_hidden_layers: 12, num_labels: 2}}
      weights: ./bert-base-uncased-mrpc          # a save_pretrained folder, or a .safetensors file

transformers is an optional dependency (``pip install 'kdgraph[hf]'``). A spec is untrusted, so:

* ``CLASS`` must be one of transformers' own ``Auto*`` model classes or a ``PreTrainedModel`` subclass exported
  by transformers (``BertForSequenceClassification``); nothing else is looked up, never remote code
  (``trust_remote_code`` and ``auto_map`` are refused).
* ``kwargs.config`` is a mapping with ``model_type`` (``AutoConfig.for_model``), ``{gguf: FILE.gguf}`` (the
  metadata of a GGUF file, :mod:`kdgraph.models.gguf_support`) or a local folder holding ``config.json``
  (``AutoConfig.from_pretrained(folder, local_files_only=True)``; a relative ``./`` path is relative to the spec
  file). Other keys of ``kwargs`` override config attributes (``num_labels: 3``).
  Nothing is ever downloaded: a hub name is refused before transformers sees it.
* The network is randomly initialised from the config; weights come from the spec's ``weights:`` and are loaded
  by kdgraph (:func:`load_hf_weights`): strict key checks, safetensors (single file or sharded index) or a
  ``pytorch_model.bin`` read with ``weights_only=True``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError, did_you_mean

__all__ = ["build_hf_model", "hf_folder_state_dict", "load_hf_weights", "is_hf_folder", "save_hf_folder",
           "REFUSED_KWARGS"]

#: keyword arguments that would reach the network, the hub or code outside the spec's config
REFUSED_KWARGS = ("trust_remote_code", "auto_map", "pretrained_model_name_or_path", "cache_dir", "revision",
                  "token", "use_auth_token", "force_download", "proxies", "local_files_only", "subfolder",
                  "code_revision", "_commit_hash", "name_or_path")
_CLASS_RE = re.compile(r"[A-Z][A-Za-z0-9]*")
_INDEX = "model.safetensors.index.json"
_LEGACY = ((".gamma", ".weight"), (".beta", ".bias"))  # old TF-era LayerNorm names, renamed as transformers does


def _transformers(role: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelError(f"{role}.model: 'hf:' models need the transformers package: pip install 'kdgraph[hf]' "
                         f"(or pip install transformers)") from None
    return transformers


def _model_class(tf: Any, name: str, role: str) -> Any:
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    obj = None
    if _CLASS_RE.fullmatch(name) and name in dir(tf):
        try:
            obj = getattr(tf, name)
        except (ImportError, AttributeError, RuntimeError):
            obj = None
    if isinstance(obj, type) and (issubclass(obj, _BaseAutoModelClass) or
                                  (issubclass(obj, PreTrainedModel) and obj is not PreTrainedModel)):
        return obj
    known = [n for n in dir(tf) if _CLASS_RE.fullmatch(n) and (n.startswith("AutoModel") or n.endswith(
        ("Model", "ForSequenceClassification", "ForMaskedLM", "ForTokenClassification", "ForQuestionAnswering")))]
    raise ModelError(f"{role}.model: 'hf:{name}' is not a transformers model class.{did_you_mean(name, known)} "
                     f"An hf: reference names one of transformers' Auto model classes "
                     f"(AutoModelForSequenceClassification, AutoModel, ...) or a PreTrainedModel subclass it exports "
                     f"(BertForSequenceClassification, ...); nothing else is looked up.")


def _config(tf: Any, kwargs: dict[str, Any], role: str) -> Any:
    refused = [k for k in REFUSED_KWARGS if k in kwargs or (isinstance(kwargs.get("config"), dict)
                                                            and k in kwargs["config"])]
    if refused:
        raise ModelError(f"{role}.kwargs: {', '.join(refused)} not allowed for an hf: model: kdgraph never downloads, "
                         f"never runs a model's own code, and reads weights only from {role}.weights")
    if "config" not in kwargs:
        raise ModelError(f"{role}.kwargs.config is missing: an hf: model is built from a config, either inline "
                         f"({{model_type: bert, hidden_size: 768, ...}}) or a local folder holding config.json")
    cfg, overrides = kwargs["config"], {k: v for k, v in kwargs.items() if k != "config"}
    if isinstance(cfg, dict) and "gguf" in cfg:  # the config in a GGUF file's metadata (kdgraph.models.gguf_support)
        from .gguf_support import gguf_config

        cfg = {**gguf_config(str(cfg["gguf"]), f"{role}.kwargs.config.gguf"),
               **{k: v for k, v in cfg.items() if k != "gguf"}}
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        model_type = cfg.pop("model_type", None)
        types = sorted(tf.CONFIG_MAPPING.keys())
        if model_type not in types:
            raise ModelError(f"{role}.kwargs.config.model_type: {model_type!r} is not a transformers model type."
                             f"{did_you_mean(str(model_type), types)} It is required for an inline config "
                             f"(e.g. bert, roberta, distilbert).")
        try:
            return tf.AutoConfig.for_model(model_type, **{**cfg, **overrides})
        except (TypeError, ValueError) as e:
            raise ModelError(f"{role}.kwargs.config: transformers rejected the {model_type} config: {e}") from None
    if not isinstance(cfg, str):
        raise ModelError(f"{role}.kwargs.config: expected a mapping with model_type or a local folder path, got "
                         f"{type(cfg).__name__}")
    folder = Path(cfg).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelError(f"{role}.kwargs.config: {cfg!r} is not a local folder holding config.json (kdgraph never "
                         f"downloads; a hub name such as 'bert-base-uncased' is not read). Save one on a connected "
                         f"machine with AutoConfig.from_pretrained(NAME).save_pretrained(DIR) and give DIR "
                         f"(a relative './DIR' is relative to the spec file).")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{role}.kwargs.config: {folder / 'config.json'} is not readable JSON ({e})") from None
    if isinstance(raw, dict) and "auto_map" in raw:
        raise ModelError(f"{role}.kwargs.config: {folder / 'config.json'} has auto_map (a model with its own code); "
                         f"kdgraph never runs remote code: use a model type transformers ships")
    try:
        return tf.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False, **overrides)
    except (OSError, TypeError, ValueError, KeyError) as e:
        raise ModelError(f"{role}.kwargs.config: cannot read the config in {str(folder)!r}: {e}") from None


def build_hf_model(name: str, kwargs: dict[str, Any], role: str) -> nn.Module:
    """The transformers network ``hf:NAME`` names, randomly initialised from ``kwargs.config`` (see the module)."""
    tf = _transformers(role)
    cls = _model_class(tf, name, role)
    config = _config(tf, dict(kwargs), role)
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    try:
        if issubclass(cls, _BaseAutoModelClass):
            return cls.from_config(config, trust_remote_code=False)
        return cls(config)
    except (TypeError, ValueError, AttributeError) as e:
        raise ModelError(f"{role}: transformers {name} cannot be built from the {config.model_type} config: "
                         f"{e}") from None


# --------------------------------------------------------------------------------------------
# weights: save_pretrained folders, safetensors
# --------------------------------------------------------------------------------------------


def is_hf_folder(path: str | Path) -> bool:
    """A folder that holds model weights as save_pretrained writes them."""
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in (_INDEX, "model.safetensors", "pytorch_model.bin"))


def hf_folder_state_dict(folder: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The state_dict in a ``save_pretrained`` folder: ``model.safetensors``, its sharded index, or
    ``pytorch_model.bin`` (``weights_only=True``); each file verified by :func:`kdgraph.models.weightio.load_file`."""
    from ..errors import CheckpointError
    from .weightio import load_file

    p = Path(folder)
    try:
        if (p / _INDEX).is_file():
            index = json.loads((p / _INDEX).read_text())
            shards = sorted(set(index["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                if Path(shard).name != shard:
                    raise ModelError(f"{what}: {p / _INDEX} names shard {shard!r} outside the folder")
                sd.update(load_file(p / shard, what))
            return sd
        for f in ("model.safetensors", "pytorch_model.bin"):
            if (p / f).is_file():
                return load_file(p / f, what)
    except CheckpointError as e:
        raise ModelError(str(e)) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{what}: {p / _INDEX} is not a valid safetensors index ({e})") from None
    raise ModelError(f"{what}: folder {str(p)!r} holds no model.safetensors, {_INDEX} or pytorch_model.bin "
                     f"(write one with model.save_pretrained(DIR))")


def load_hf_weights(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Load ``sd`` into ``model`` with strict key checks; old LayerNorm names (``gamma``/``beta``) are renamed,
    and a key missing from ``sd`` is accepted only when its tensor is tied to one ``sd`` holds (as save_pretrained
    leaves tied weights out)."""
    renamed = {}
    for k, v in sd.items():
        for old, new in _LEGACY:
            if k.endswith(old) and "LayerNorm" in k:
                k = k[: -len(old)] + new
        renamed[k] = v
    own = model.state_dict(keep_vars=True)
    missing = [k for k in own if k not in renamed]
    unexpected = sorted(k for k in renamed if k not in own)
    ptr = {own[k].data_ptr(): k for k in own if k in renamed}
    untied = [k for k in missing if own[k].data_ptr() not in ptr]
    if untied or unexpected:
        raise ModelError(
            f"{what}: the weights do not fit {type(model).__name__}: {len(untied)} missing key(s) "
            f"{untied[:5]}{' ...' if len(untied) > 5 else ''}, {len(unexpected)} unexpected "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. Keys are checked strictly. A pretrained "
            f"backbone (e.g. bert-base-uncased, with pretraining heads cls.* and no classifier.*) is not a "
            f"sequence classifier: on any machine, load it with AutoModelForSequenceClassification.from_pretrained"
            f"(DIR, num_labels=N, local_files_only=True) and save_pretrained it, then name that folder.")
    try:
        model.load_state_dict({k: v for k, v in renamed.items()}, strict=False)
    except RuntimeError as e:
        from .weightio import brief

        raise ModelError(f"{what}: the weights do not fit {type(model).__name__}: {brief(e)}") from None


def save_hf_folder(model: nn.Module, sd: dict[str, torch.Tensor], folder: str | Path) -> list[str]:
    """``sd`` loaded into ``model`` (a transformers network), written with ``save_pretrained`` (safetensors);
    returns the files written."""
    load_hf_weights(model, sd, f"export to {folder}")
    Path(folder).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))  # transformers 5 writes safetensors
    return sorted(p.name for p in Path(folder).iterdir())
