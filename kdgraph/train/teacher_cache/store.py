"""The teacher cache on disk: a manifest, and per rank one shard of memory-mapped ``.npy`` arrays.

::

    DIR/manifest.json                      what the cache was made from (spec, teacher weights, data, transform)
    DIR/rank000-of-001.json                a shard's entry: written last, only once the shard is complete
    DIR/rank000-of-001.logits.npy          float16 rows x R x K (full logits), or with --topk K':
    DIR/rank000-of-001.top_values.npy      float16 rows x R x K', .top_indices.npy int32, .logsumexp.npy float32
    DIR/rank000-of-001.seeds.npy           int64 rows x R: each view's augmentation seed
    DIR/rank000-of-001.params.npy          int32 rows x R x P: the random parameters that seed gave (crop, flip)

Rank ``r`` of ``W`` holds images ``r, r + W, r + 2W, ...`` (row ``i // W``). While a shard is written its arrays
are ``*.npy.partial`` and ``rankNNN-of-WWW.progress.json`` says how many rows are flushed; a killed run continues
from there. When the last row is flushed the arrays are renamed and the entry (sizes, sha256) written, each by
write-to-temp + rename, so a partial shard is never taken for a complete one. :func:`open_cache` refuses, with one
:class:`~kdgraph.errors.TeacherCacheError` paragraph, a cache that is incomplete, truncated or made from another
spec, teacher or data set; nothing is recomputed or mixed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ...compiler.cached import TEACHER_OUTPUT_KEY
from ...errors import TeacherCacheError
from ...models.weightio import file_sha256

__all__ = ["MANIFEST", "FORMAT", "VERSION", "VERIFY_SHA256_BYTES", "shard_stem", "array_layout", "write_json",
           "read_manifest", "check_manifest", "checked_manifest", "load_shards", "ShardWriter", "CacheReader", "open_cache", "fill_topk"]

MANIFEST = "manifest.json"
FORMAT, VERSION = "kdgraph-teacher-cache", 1
VERIFY_SHA256_BYTES = 1 << 30  # caches up to 1 GiB are checked byte for byte when opened; larger ones by size


def shard_stem(rank: int, world: int) -> str:
    return f"rank{rank:03d}-of-{world:03d}"


def rows_of(rank: int, world: int, n: int) -> int:
    return len(range(rank, n, world))


def total_rows(manifest: dict[str, Any]) -> int:
    """Images (an image cache) or sequences (a token cache) the cache holds."""
    data = manifest["data"]
    return int(data["sequences"] if manifest.get("kind") == "tokens" else data["images"])


def array_layout(manifest: dict[str, Any], rows: int, rank: int = 0) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """name -> (dtype, shape) of one shard's arrays (rank ``rank``'s, for a token cache)."""
    if manifest.get("kind") == "tokens":
        from .token_layout import token_layout

        return token_layout(manifest, rows, rank)
    r, k, topk = manifest["views"], manifest["num_classes"], manifest["topk"]
    out: dict[str, tuple[Any, tuple[int, ...]]] = {}
    if topk:
        out.update(top_values=(np.float16, (rows, r, topk)), top_indices=(np.int32, (rows, r, topk)),
                   logsumexp=(np.float32, (rows, r)))
    else:
        out["logits"] = (np.float16, (rows, r, k))
    out.update(seeds=(np.int64, (rows, r)), params=(np.int32, (rows, r, len(manifest["transform"]["params"]))))
    return out


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temp file in the same folder, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TeacherCacheError(f"{what} {path} cannot be read ({e}); it was not written by kdgraph cache-teacher "
                                f"or is damaged. Make the cache again (kdgraph cache-teacher SPEC --out DIR "
                                f"--overwrite).") from None


def read_manifest(folder: Path) -> Optional[dict[str, Any]]:
    return _read_json(folder / MANIFEST, "the teacher cache manifest")


_CHECKED = (  # (key path, what it is for people)
    (("format",), "format"), (("version",), "format version"),
    (("identity", "teacher", "model"), "teacher.model"), (("identity", "teacher", "kwargs"), "teacher.kwargs"),
    (("identity", "input"), "input (channels, size, num_classes)"), (("identity", "data", "dataset"), "data.dataset"),
    (("identity", "data", "train_subset"), "data.train_subset"), (("identity", "seed"), "runtime.seed"),
    (("teacher_weights_sha256",), "the teacher's weights (sha256 of its state_dict)"),
    (("data", "images"), "the number of training images"), (("data", "sha256"), "the training images (sha256)"),
    (("transform",), "the training augmentation"), (("num_classes",), "the number of classes"),
    (("tap",), "the cached tap"))
_RUN = ((("views",), "--views"), (("topk",), "--topk"), (("world_size",), "the number of processes"))


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for k in path:
        d = d.get(k) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def check_manifest(found: dict[str, Any], expected: dict[str, Any], where: str, folder: Path,
                   run_fields: bool = False, fields: tuple = _CHECKED, run: tuple = _RUN) -> None:
    """Raise if ``found`` (a cache's manifest) was made from something else than ``expected`` describes
    (``fields``: (key path, what it is for people) pairs; ``run``: those checked too when writing)."""
    for path, what in fields + (run if run_fields else ()):
        a, b = _get(found, path), _get(expected, path)
        if a != b:
            raise TeacherCacheError(
                f"{where}: the teacher cache {folder} does not match this run: {what} differs (cache: "
                f"{_short(a)}; this run: {_short(b)}). Nothing is recomputed or mixed: make the "
                f"cache for this spec, teacher and data (kdgraph cache-teacher SPEC --out DIR"
                f"{' --overwrite' if run_fields else ''}), or point runtime.teacher_cache at one made for it.")


class ShardWriter:
    """One rank's shard, written row block by row block; resumable and committed atomically."""

    def __init__(self, folder: Path, manifest: dict[str, Any], rank: int, world: int):
        self.folder, self.manifest = folder, manifest
        self.stem = shard_stem(rank, world)
        self.rows = rows_of(rank, world, total_rows(manifest))
        self.layout = array_layout(manifest, self.rows, rank)
        self.entry_path = folder / f"{self.stem}.json"
        self.progress_path = folder / f"{self.stem}.progress.json"
        self.arrays: dict[str, np.memmap] = {}
        self.done = 0

    def _partial(self, name: str) -> Path:
        return self.folder / f"{self.stem}.{name}.npy.partial"

    def open(self) -> int:
        """Open (or create) the shard; returns the rows already written (``rows`` when it is complete)."""
        if self.entry_path.is_file():
            self.done = self.rows
            return self.done
        progress = _read_json(self.progress_path, "the shard progress file")
        resumable = progress is not None and progress.get("manifest_sha256") == self.manifest["manifest_sha256"] \
            and all(self._partial(n).is_file() for n in self.layout)
        from numpy.lib.format import open_memmap

        for name, (dtype, shape) in self.layout.items():
            path = self._partial(name)
            if resumable:
                arr = open_memmap(path, mode="r+")
                if arr.shape != shape or arr.dtype != np.dtype(dtype):
                    resumable = False
            if not resumable:
                arr = open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            self.arrays[name] = arr
        if not resumable:  # start over: any array opened for resuming above is recreated
            self.arrays = {n: open_memmap(self._partial(n), mode="w+", dtype=d, shape=s)
                           for n, (d, s) in self.layout.items()}
        self.done = int(progress["done"]) if resumable and progress is not None else 0
        return self.done

    def write(self, start: int, values: dict[str, np.ndarray]) -> None:
        for name, v in values.items():
            self.arrays[name][start: start + len(v)] = v

    def commit(self, done: int) -> None:
        """Flush the arrays, then record ``done`` rows (a kill after this keeps them)."""
        for arr in self.arrays.values():
            arr.flush()
        self.done = done
        write_json(self.progress_path, {"done": done, "rows": self.rows,
                                        "manifest_sha256": self.manifest["manifest_sha256"]})

    def finish(self) -> None:
        """Rename the complete arrays into place and write the shard's entry (last)."""
        files = {}
        for name, arr in self.arrays.items():
            arr.flush()
            del arr
        self.arrays.clear()
        for name in self.layout:
            final = self.folder / f"{self.stem}.{name}.npy"
            os.replace(self._partial(name), final)
            files[name] = {"file": final.name, "bytes": final.stat().st_size, "sha256": file_sha256(final)}
        write_json(self.entry_path, {"rows": self.rows, "files": files, "manifest_sha256":
                                     self.manifest["manifest_sha256"]})
        self.progress_path.unlink(missing_ok=True)


def fill_topk(values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full logits from a top-K' record: the stored K' logits in place, and the probability mass they leave,
    ``m = 1 - sum_j exp(v_j - lse)`` (``lse``: the full logits' logsumexp, stored), spread uniformly over the
    other ``K - K'`` classes in logit space: ``z_c = lse + log(m / (K - K'))``. So ``softmax(z)`` has the
    teacher's exact top-K' probabilities (at temperature 1) and its exact total tail mass."""
    values, lse = values.float(), lse.float()
    rest = num_classes - values.shape[1]
    out = torch.empty(values.shape[0], num_classes)
    if rest > 0:
        mass = (1.0 - torch.exp(values - lse[:, None]).sum(dim=1)).clamp_min(1e-12)
        out[:] = (lse + torch.log(mass / rest))[:, None]
    out.scatter_(1, indices.long(), values)
    return out


class CacheReader:
    """A complete, checked cache, memory-mapped: the stored teacher outputs of (image, view) pairs."""

    def __init__(self, folder: Path, manifest: dict[str, Any], shards: list[dict[str, np.ndarray]]):
        self.folder, self.manifest, self.shards = folder, manifest, shards
        self.views, self.topk = int(manifest["views"]), manifest["topk"]
        self.world, self.num_classes = int(manifest["world_size"]), int(manifest["num_classes"])

    def outputs(self, indices: list[int], views: list[int]) -> dict[str, torch.Tensor]:
        """``{"teacher_output": float32 B x K}``: the stored teacher logits of view ``views[b]`` of image
        ``indices[b]`` (top-K' records filled in by :func:`fill_topk`)."""
        idx, v = np.asarray(indices, dtype=np.int64), np.asarray(views, dtype=np.int64)
        shard, row = idx % self.world, idx // self.world
        b = len(idx)
        if self.topk:
            vals, inds = np.empty((b, self.topk), np.float16), np.empty((b, self.topk), np.int32)
            lse = np.empty((b,), np.float32)
        else:
            out = np.empty((b, self.num_classes), np.float16)
        for s in np.unique(shard):
            m = shard == s
            arrays = self.shards[int(s)]
            if self.topk:
                vals[m] = arrays["top_values"][row[m], v[m]]
                inds[m] = arrays["top_indices"][row[m], v[m]]
                lse[m] = arrays["logsumexp"][row[m], v[m]]
            else:
                out[m] = arrays["logits"][row[m], v[m]]
        if self.topk:
            full = fill_topk(torch.from_numpy(vals), torch.from_numpy(inds), torch.from_numpy(lse), self.num_classes)
        else:
            full = torch.from_numpy(out).float()
        return {TEACHER_OUTPUT_KEY: full}

    def seeds(self, index: int) -> list[int]:
        """The augmentation seeds of image ``index``'s stored views."""
        return [int(s) for s in self.shards[index % self.world]["seeds"][index // self.world]]


def open_cache(folder: Path, expected: dict[str, Any], where: str) -> CacheReader:
    """The cache in ``folder``, checked against ``expected`` (this run's manifest fields), complete and intact."""
    manifest = checked_manifest(folder, expected, where)
    return CacheReader(folder, manifest, load_shards(folder, manifest, where))


def checked_manifest(folder: Path, expected: dict[str, Any], where: str,
                     fields: tuple = _CHECKED) -> dict[str, Any]:
    """The manifest of the cache in ``folder``, refused unless it matches ``expected`` on ``fields``."""
    hint = "Make it with `kdgraph cache-teacher SPEC --views R --out DIR` (a killed run resumes where it stopped)."
    if not folder.is_dir():
        raise TeacherCacheError(f"{where}: the teacher cache folder {folder} does not exist. {hint}")
    manifest = read_manifest(folder)
    if manifest is None:
        raise TeacherCacheError(f"{where}: {folder} holds no teacher cache ({MANIFEST} is missing). {hint}")
    check_manifest(manifest, expected, where, folder, fields=fields)
    return manifest


def load_shards(folder: Path, manifest: dict[str, Any], where: str) -> list[dict[str, np.ndarray]]:
    """Every shard's arrays, memory-mapped, once each is complete and matches its entry (sizes, sha256)."""
    world, n = int(manifest["world_size"]), total_rows(manifest)
    shards, total = [], 0
    entries = []
    for rank in range(world):
        stem = shard_stem(rank, world)
        entry = _read_json(folder / f"{stem}.json", "the shard entry")
        if entry is None or entry.get("manifest_sha256") != manifest["manifest_sha256"]:
            state = "is still being written or was stopped" if (folder / f"{stem}.progress.json").is_file() \
                else "is missing"
            raise TeacherCacheError(f"{where}: the teacher cache {folder} is incomplete: shard {stem} (rank {rank} "
                                    f"of {world}) {state}; an incomplete cache is never used. Run the same "
                                    f"`kdgraph cache-teacher` again (with {world} process(es)): it resumes.")
        entries.append((stem, entry))
        total += sum(int(f["bytes"]) for f in entry["files"].values())
    verify = total <= VERIFY_SHA256_BYTES
    for rank, (stem, entry) in enumerate(entries):
        arrays = {}
        for name, (dtype, shape) in array_layout(manifest, rows_of(rank, world, n), rank).items():
            rec = entry["files"].get(name)
            path = folder / (rec["file"] if rec else f"{stem}.{name}.npy")
            size = path.stat().st_size if path.is_file() else None
            bad = None
            if rec is None or size is None:
                bad = "is missing"
            elif size != int(rec["bytes"]):
                bad = f"has {size:,} bytes, its entry says {int(rec['bytes']):,} (truncated or overwritten)"
            elif verify and file_sha256(path) != rec["sha256"]:
                bad = "does not have the content its entry records (sha256 differs)"
            if bad is None:
                try:
                    arr = np.load(path, mmap_mode="r")
                except (OSError, ValueError) as e:
                    bad = f"cannot be read as an array ({e})"
                else:
                    if arr.shape != shape or arr.dtype != np.dtype(dtype):
                        bad = f"holds {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape}"
            if bad is not None:
                raise TeacherCacheError(f"{where}: the teacher cache {folder} is damaged: {path.name} {bad}. "
                                        f"Nothing is recomputed or mixed: make the cache again (kdgraph "
                                        f"cache-teacher SPEC --out DIR --overwrite).")
            arrays[name] = arr
        shards.append(arrays)
    return shards
