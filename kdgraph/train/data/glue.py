"""GLUE (``data.dataset: glue``): a local copy of one task, tokenized with a local tokenizer, served as dict batches.

The copy under ``data.root`` (or ``data.root/<task>``) is either a ``datasets.save_to_disk`` folder (read with
``datasets.load_from_disk``) or the original GLUE TSV files (``CoLA/train.tsv``, ``dev.tsv``; MNLI's
``dev_matched.tsv`` / ``dev_mismatched.tsv``), read with :mod:`csv`. The tokenizer is a local ``save_pretrained``
folder (``data.tokenizer``, ``AutoTokenizer.from_pretrained(folder, local_files_only=True)``): nothing is downloaded.
Examples are tokenized once; a batch is ``{input_ids, attention_mask, token_type_ids, labels}`` padded to its
longest example (``padding: longest``, as ``DataCollatorWithPadding``) or to ``max_length``, rounded up to a
multiple of ``pad_to_multiple_of`` when given (as the collator's option of that name); labels are int64 class
ids (float32 scores for STS-B), in the label order of ``datasets``' ``nyu-mll/glue``.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import Dataset

from ...errors import DataError

__all__ = ["GLUE_TASKS", "GlueDataset", "glue_help", "find_glue", "glue_splits", "glue_datasets", "load_tokenizer"]

#: task -> (GLUE folder name, text columns, number of labels; 1 = regression)
GLUE_TASKS: dict[str, tuple[str, tuple[str, ...], int]] = {
    "cola": ("CoLA", ("sentence",), 2), "sst2": ("SST-2", ("sentence",), 2),
    "mrpc": ("MRPC", ("sentence1", "sentence2"), 2), "stsb": ("STS-B", ("sentence1", "sentence2"), 1),
    "qqp": ("QQP", ("question1", "question2"), 2), "mnli": ("MNLI", ("premise", "hypothesis"), 3),
    "qnli": ("QNLI", ("question", "sentence"), 2), "rte": ("RTE", ("sentence1", "sentence2"), 2),
    "wnli": ("WNLI", ("sentence1", "sentence2"), 2)}
#: TSV file -> split; MNLI's two validation splits
_TSV_SPLITS = {"train": "train.tsv", "validation": "dev.tsv", "validation_matched": "dev_matched.tsv",
               "validation_mismatched": "dev_mismatched.tsv"}
#: the TSV header (or column index, for headerless CoLA) of each text column and the label, per task
_TSV_COLUMNS: dict[str, tuple[tuple[Any, ...], Any]] = {
    "cola": ((3,), 1), "sst2": (("sentence",), "label"), "mrpc": (("#1 String", "#2 String"), "Quality"),
    "stsb": (("sentence1", "sentence2"), "score"), "qqp": (("question1", "question2"), "is_duplicate"),
    "mnli": (("sentence1", "sentence2"), "gold_label"), "qnli": (("question", "sentence"), "label"),
    "rte": (("sentence1", "sentence2"), "label"), "wnli": (("sentence1", "sentence2"), "label")}
_LABEL_NAMES = {"mnli": ("entailment", "neutral", "contradiction"), "qnli": ("entailment", "not_entailment"),
                "rte": ("entailment", "not_entailment")}


def glue_help(task: str) -> str:
    """How to get the task's data and a tokenizer on a connected machine."""
    return (f"On a machine with network: python -c \"from datasets import load_dataset; "
            f"load_dataset('nyu-mll/glue', '{task}').save_to_disk('DIR/{task}')\" (or unpack the original GLUE "
            f"{GLUE_TASKS[task][0]}/ folder of TSV files into DIR), and python -c \"from transformers import "
            f"AutoTokenizer; AutoTokenizer.from_pretrained('bert-base-uncased').save_pretrained('TOKDIR')\"; copy both "
            f"here and set data.root: DIR (or --data DIR) and data.tokenizer: TOKDIR.")


def find_glue(root: Optional[str], task: str) -> tuple[str, Path]:
    """``("disk" | "tsv", folder)`` of the task's local copy, or a DataError saying how to get it."""
    if not root:
        raise DataError(f"data.root: GLUE {task} needs a local copy; none is set. {glue_help(task)}")
    base = Path(root).expanduser()
    for folder in (base / task, base / GLUE_TASKS[task][0], base):
        if (folder / "dataset_dict.json").is_file():
            return "disk", folder
        if (folder / "train.tsv").is_file():
            return "tsv", folder
    raise DataError(f"data.root: {str(base)!r} holds no GLUE {task} data (looked for a save_to_disk folder with "
                    f"dataset_dict.json, or train.tsv, in {base}, {base / task} and {base / GLUE_TASKS[task][0]}). "
                    f"{glue_help(task)}")


def _label(task: str, raw: str, where: str) -> float | int:
    if task == "stsb":
        return float(raw)
    names = _LABEL_NAMES.get(task)
    try:
        return names.index(raw) if names else int(raw)
    except ValueError:
        raise DataError(f"{where}: label {raw!r} is not one of {names or 'the integers 0, 1'} for GLUE {task}") from None


def _read_tsv(path: Path, task: str) -> tuple[list[tuple[str, ...]], list[Any]]:
    texts_cols, label_col = _TSV_COLUMNS[task]
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = None if task == "cola" else next(rows, None)
        for n, row in enumerate(rows, start=2 if header else 1):
            if not row:
                continue
            get = (lambda c: row[c]) if header is None else (lambda c: row[header.index(c)])
            try:
                texts.append(tuple(get(c) for c in texts_cols))
                labels.append(_label(task, get(label_col), f"{path} line {n}"))
            except (IndexError, ValueError):
                raise DataError(f"{path} line {n}: not a GLUE {task} row (expected columns "
                                f"{', '.join(map(str, (*texts_cols, label_col)))}{'' if header else ', no header'})"
                                ) from None
    return texts, labels


def _read_split(kind: str, folder: Path, task: str, split: str) -> tuple[list[tuple[str, ...]], list[Any]]:
    if kind == "tsv":
        path = folder / _TSV_SPLITS[split]
        if not path.is_file():
            raise DataError(f"{folder}: no {path.name} (the GLUE {task} {split} split). {glue_help(task)}")
        return _read_tsv(path, task)
    try:
        from datasets import load_from_disk
    except ImportError:
        raise DataError(f"{folder} is a datasets.save_to_disk folder; reading it needs the datasets package: "
                        f"pip install 'kdgraph[hf]'") from None
    dd = load_from_disk(str(folder))
    if split not in dd:
        raise DataError(f"{folder}: no {split!r} split (it has {', '.join(dd)}). {glue_help(task)}")
    ds, cols = dd[split], GLUE_TASKS[task][1]
    missing = [c for c in (*cols, "label") if c not in ds.column_names]
    if missing:
        raise DataError(f"{folder} ({split}): no column {', '.join(missing)} (it has {', '.join(ds.column_names)}); "
                        f"is it GLUE {task}?")
    return list(zip(*(ds[c] for c in cols))), list(ds["label"])


def load_tokenizer(folder: Optional[str], task: str) -> Any:
    """``AutoTokenizer.from_pretrained(folder, local_files_only=True)`` of a local folder, or a DataError."""
    if not folder or not Path(folder).expanduser().is_dir():
        raise DataError(f"data.tokenizer: {folder!r} is not a local tokenizer folder (kdgraph never downloads; a hub "
                        f"name is not read). {glue_help(task)}")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError("data.tokenizer: tokenizing GLUE needs transformers: pip install 'kdgraph[hf]'") from None
    try:
        return AutoTokenizer.from_pretrained(str(Path(folder).expanduser()), local_files_only=True,
                                             trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"data.tokenizer: {folder!r} cannot be read as a tokenizer ({e})") from None


class GlueDataset(Dataset):
    """One tokenized GLUE split; :meth:`get_batch` pads a whole batch (``padding``: longest or max_length)."""

    def __init__(self, encoded: dict[str, list[list[int]]], labels: Sequence[Any], regression: bool, pad_id: int,
                 max_length: int, padding: str = "longest", description: str = "GLUE",
                 pad_to_multiple_of: Optional[int] = None):
        self.encoded, self.regression, self.pad_id = encoded, regression, pad_id
        self.multiple = pad_to_multiple_of
        self.labels = torch.tensor(labels, dtype=torch.float32 if regression else torch.int64)
        self.max_length, self.padding, self.description = max_length, padding, description

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.get_batch([index]).items()}

    def get_batch(self, indices: Sequence[int], seeds: Any = None) -> dict[str, torch.Tensor]:
        ids = [self.encoded["input_ids"][i] for i in indices]
        width = self.max_length if self.padding == "max_length" else max(len(x) for x in ids)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        out: dict[str, torch.Tensor] = {}
        for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key not in self.encoded:
                continue
            rows = [self.encoded[key][i] for i in indices]
            out[key] = torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.int64)
        out["labels"] = self.labels[list(indices)]
        return out


def glue_splits(root: Optional[str], task: str, tokenizer_dir: Optional[str], max_length: int = 128,
                padding: str = "longest", splits: Sequence[str] = ("train", "validation"),
                pad_to_multiple_of: Optional[int] = None) -> dict[str, GlueDataset]:
    """The task's named splits, tokenized (MNLI's validation is ``validation_matched`` / ``_mismatched``)."""
    kind, folder = find_glue(root, task)
    tok = load_tokenizer(tokenizer_dir, task)
    out = {}
    for split in splits:
        texts, labels = _read_split(kind, folder, task, split)
        if not labels:
            raise DataError(f"{folder}: the GLUE {task} {split} split is empty")
        columns = list(zip(*texts))
        enc = tok(*columns, truncation=True, max_length=max_length, return_attention_mask=True)
        keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        out[split] = GlueDataset({k: list(enc[k]) for k in keep}, labels, task == "stsb", tok.pad_token_id or 0,
                                 max_length, padding, f"GLUE {task} {split} ({folder}, {len(labels)} examples)",
                                 pad_to_multiple_of)
    return out


def glue_datasets(root: Optional[str], task: str, tokenizer_dir: Optional[str], max_length: int, padding: str,
                  need_train: bool = True, pad_to_multiple_of: Optional[int] = None) -> tuple[Dataset, Dataset, str]:
    """``(train, validation, description)`` for :func:`~kdgraph.train.data.build_datasets` (MNLI: matched)."""
    val_name = "validation_matched" if task == "mnli" else "validation"
    splits = glue_splits(root, task, tokenizer_dir, max_length, padding,
                         ("train", val_name) if need_train else (val_name,), pad_to_multiple_of)
    val = splits[val_name]
    return splits.get("train", val), val, f"GLUE {task} ({val.description.split('(')[1].split(',')[0]})"
