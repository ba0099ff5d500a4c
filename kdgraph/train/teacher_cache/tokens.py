"""``kdgraph cache-teacher --topk K`` for a causal LM: per kept token, the teacher's top-K next-token ids
(bit-packed), their log-probabilities at the loss temperature (bf16) and the tail mass (fp32), so that training
reads a sparse teacher instead of running it (:mod:`.token_layout` for the files, :mod:`.token_reader` to read).

**Why log-probabilities at T, not logits**: the tail mass ``1 - sum_k p_t,k`` at temperature T depends on every
logit, so it is only exact if computed here; the cache records T and a loss with another T is refused.

The teacher runs in float32, eval mode, without gradients, on the spec's named inputs; its tapped output
(``runtime.teacher_cache_tap``, e.g. ``teacher:lm_head``: ``B x T x V`` logits) is aligned as the token losses do
(causal shift, labels ``-100`` dropped, vocabulary sliced to ``vocab_size``). Each rank writes its own shard;
``batch_size`` sequences are committed at a time, so a run killed with SIGKILL resumes at its last complete block
and ends byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ...errors import TeacherCacheError
from ...methods.token_base import IGNORE_INDEX
from ...methods.token_sparse import sparse_from_logits
from ...spec import Spec, parse_tap
from ..distributed import barrier, setup, teardown
from .bitpack import id_bits, pack_ids
from .fingerprint import canonical_hash, teacher_weights_sha256
from .store import FORMAT, MANIFEST, VERSION, ShardWriter, check_manifest, read_manifest, write_json
from .token_data import TokenArrays, kept_counts, read_batch, sequences_identity, tokenizer_identity
from .token_layout import TOKEN_CHECKED, TOKEN_RUN, bytes_per_token

__all__ = ["describe_tokens", "cache_tokens", "loss_setting", "tapped_logits"]


def loss_setting(spec: Spec, key: str, default: Any) -> Any:
    """The one value of ``args.<key>`` over the losses that read the cached tap (``default`` if none sets it)."""
    tap = spec.runtime.teacher_cache_tap
    found = {repr(ls.args.get(key, default)): ls.args.get(key, default)
             for st in spec.stages for ls in st.losses if tap in dict(ls.inputs).values()}
    if len(found) > 1:
        raise TeacherCacheError(f"--{key.replace('_', '-')}: the losses reading {tap} use different {key} values "
                                f"({', '.join(sorted(found))}); a top-K cache holds one: give --"
                                f"{key.replace('_', '-')} (and one cache per value)")
    return next(iter(found.values())) if found else default


def describe_tokens(spec: Spec, teacher: nn.Module, dataset: Any, tokenizer: Optional[str] = None,
                    vocab_size: Optional[int] = None) -> dict[str, Any]:
    """The manifest fields a token cache is checked against (what the stored distributions depend on)."""
    vocab = vocab_size or loss_setting(spec, "vocab_size", None) or \
        getattr(getattr(teacher, "config", None), "vocab_size", None)
    if not vocab:
        raise TeacherCacheError("--vocab-size: the teacher has no config.vocab_size and no loss reading the cached "
                                "tap sets args.vocab_size; give the tokenizer's size")
    return {"format": FORMAT, "version": VERSION, "kind": "tokens", "tap": spec.runtime.teacher_cache_tap,
            "identity": {"teacher": {"model": spec.teacher.model, "kwargs": spec.teacher.kwargs},
                         "input": {k: v.model_dump(mode="json") for k, v in spec.input.named.items()}},
            "spec_name": spec.name, "teacher_precision": "float32, eval mode",
            "teacher_weights_sha256": teacher_weights_sha256(teacher),
            "tokenizer": tokenizer_identity(tokenizer, dataset), "data": sequences_identity(dataset),
            "vocab_size": int(vocab), "id_bits": id_bits(int(vocab)), "shift": bool(loss_setting(spec, "shift", True)),
            "values": "log-probabilities at the temperature, bfloat16", "tail": "1 - sum of top-K probabilities, fp32"}


def tapped_logits(teacher: nn.Module, tap_text: str, batch: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """The teacher's value at ``tap_text`` (a module's output, or ``@output``'s logits) for one dict batch."""
    tap = parse_tap(tap_text)
    seen: list[Any] = []
    handle = None
    if tap.path and not tap.path.startswith("@"):
        try:
            module = teacher.get_submodule(tap.path)
        except AttributeError:
            raise TeacherCacheError(f"runtime.teacher_cache_tap: the teacher has no module {tap.path!r}") from None
        handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        out = teacher(**{k: batch[k] for k in names if k in batch})
    finally:
        if handle is not None:
            handle.remove()
    value = seen[-1] if seen else getattr(out, "logits", out)
    if not isinstance(value, torch.Tensor) or value.dim() != 3:
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise TeacherCacheError(f"runtime.teacher_cache_tap: {tap_text} gives {shape}, not B x T x V logits; a "
                                f"top-K token cache stores a causal LM's next-token logits")
    return value


@torch.no_grad()
def cache_tokens(spec: Spec, out: Path, topk: int, temperature: Optional[float] = None,
                 sequences: Optional[str] = None, tokenizer: Optional[str] = None, vocab_size: Optional[int] = None,
                 data: Optional[str] = None, device: Optional[str] = None, batch_size: int = 16,
                 overwrite: bool = False, say: Callable[[str], None] = print, teacher: Optional[nn.Module] = None,
                 dataset: Any = None) -> dict[str, Any]:
    """Write (or complete) the top-``topk`` token cache of ``spec`` in ``out``; returns a summary."""
    from .writer import _clear, build_teacher

    env = setup(device)
    try:
        t0 = time.perf_counter()
        if dataset is None and sequences is not None:
            dataset = TokenArrays(sequences)
        if dataset is None:
            from ..data import build_datasets, check_data

            root = data if data is not None else spec.data.root
            check_data(spec, root)
            dataset = build_datasets(spec, root).train
        teacher = build_teacher(spec, env.device) if teacher is None else teacher.to(env.device).eval()
        temp = float(temperature if temperature is not None else loss_setting(spec, "temperature", 1.0))
        manifest = describe_tokens(spec, teacher, dataset, tokenizer, vocab_size)
        vocab = manifest["vocab_size"]
        if not 1 <= topk <= vocab:
            raise TeacherCacheError(f"--topk: {topk}; allowed: 1 to {vocab} (the vocabulary size)")
        if temp <= 0:
            raise TeacherCacheError(f"--temperature: {temp:g}; it must be > 0")
        counts = kept_counts(dataset, manifest["shift"])
        world = env.world_size
        manifest.update(topk=int(topk), temperature=temp, world_size=world,
                        kept_tokens=int(counts.sum()), bytes_per_token=bytes_per_token(topk, manifest["id_bits"]),
                        shard_tokens=[int(counts[r::world].sum()) for r in range(world)])
        manifest["manifest_sha256"] = canonical_hash(manifest)
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        if env.is_main and overwrite:
            _clear(folder)
        barrier(env)
        found = read_manifest(folder)
        if found is not None:
            check_manifest(found, manifest, f"--out {folder}", folder, run_fields=True, fields=TOKEN_CHECKED,
                           run=TOKEN_RUN)
            manifest = found  # the same inputs: continue under the manifest on disk (its hash names the shards)
        else:
            write_json(folder / MANIFEST, manifest)
        computed, run_s = _write_shard(spec, folder, manifest, env, dataset, teacher, counts, batch_size, say)
        barrier(env)
        tokens = computed
        if env.distributed:  # every rank's count (the shards differ in size)
            import torch.distributed as dist

            count = torch.tensor([computed], dtype=torch.long, device=env.device)
            dist.all_reduce(count)
            tokens = int(count.item())
        summary = {"out": str(folder), "sequences": len(dataset), "kept_tokens": manifest["kept_tokens"],
                   "topk": topk, "temperature": temp, "vocab_size": vocab, "id_bits": manifest["id_bits"],
                   "bytes_per_token": manifest["bytes_per_token"], "computed_tokens": tokens,
                   "seconds": round(time.perf_counter() - t0, 2), "teacher_seconds": round(run_s, 2),
                   "tokens_per_s": round(tokens / run_s, 1) if tokens and run_s > 0 else None}
        if env.is_main:
            say(f"cache-teacher {spec.name}: complete in {folder} ({manifest['kept_tokens']} tokens, top-{topk}, "
                f"{manifest['bytes_per_token']} bytes per token; {tokens} computed now)")
        return summary
    finally:
        teardown(env)


def _write_shard(spec: Spec, folder: Path, manifest: dict[str, Any], env: Any, dataset: Any, teacher: nn.Module,
                 counts: np.ndarray, batch_size: int, say: Callable[[str], None]) -> tuple[int, float]:
    """This rank's shard, block by block from where it stopped; (tokens computed now, seconds)."""
    writer = ShardWriter(folder, manifest, env.rank, env.world_size)
    done = writer.open()
    indices = list(range(env.rank, len(dataset), env.world_size))
    offsets = np.zeros(len(indices) + 1, np.int64)
    np.cumsum(counts[env.rank::env.world_size], out=offsets[1:])
    if writer.arrays:
        writer.arrays["offsets"][:] = offsets
    if env.is_main:
        say(f"cache-teacher {spec.name}: {len(dataset)} sequences ({manifest['kept_tokens']} kept tokens) of "
            f"{spec.teacher.model}, top-{manifest['topk']} at T={manifest['temperature']:g} -> {folder}"
            + (f", resuming at sequence {done}" if 0 < done < len(indices) else ""))
    names = list(spec.input.named) or ["input_ids", "attention_mask"]
    k, bits, vocab, shift = manifest["topk"], manifest["id_bits"], manifest["vocab_size"], manifest["shift"]
    computed, t_run = 0, time.perf_counter()
    for start in range(done, len(indices), max(1, batch_size)):
        block = indices[start: start + batch_size]
        batch = {key: v.to(env.device) if isinstance(v, torch.Tensor) else v
                 for key, v in read_batch(dataset, block).items()}
        logits = tapped_logits(teacher, manifest["tap"], batch, names).float()
        if logits.shape[-1] < vocab:
            raise TeacherCacheError(f"--vocab-size: {vocab}, but the teacher's logits have {logits.shape[-1]} "
                                    f"entries")
        labels = batch["labels"]
        aligned, lab = (logits[:, :-1], labels[:, 1:]) if shift else (logits, labels)
        rows = aligned[..., :vocab][lab != IGNORE_INDEX]
        sp = sparse_from_logits(rows, k, manifest["temperature"], shift)
        a, b = int(offsets[start]), int(offsets[start + len(block)])
        if b - a != len(sp):
            raise TeacherCacheError(f"data: the training sequences changed while caching ({len(sp)} kept tokens "
                                    f"in sequences {block[0]}..{block[-1]}, {b - a} counted before)")
        writer.arrays["ids"][a:b] = pack_ids(sp.ids.cpu().numpy(), bits)
        writer.arrays["logp"][a:b] = sp.logp.cpu().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        writer.arrays["tail"][a:b] = sp.tail.cpu().numpy()
        computed += b - a
        writer.commit(start + len(block))
    if not writer.entry_path.is_file():
        writer.finish()
    return computed, time.perf_counter() - t_run
