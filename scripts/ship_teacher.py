"""Ship (or check) a trained network of kdgraph's cache as ``kdgraph/models/pretrained/NAME-<key>.safetensors``.

    python scripts/ship_teacher.py specs/fashion_mnist/kd.yaml            # copy the cached teacher into the package
    python scripts/ship_teacher.py specs/fashion_mnist/kd.yaml --check    # compare the cached one with the shipped one

The cache entry is the one the spec's ``teacher.weights: cache:NAME`` + ``pretrain:`` section names
($KDGRAPH_CACHE/NAME-<key>.pt, made by ``kdgraph train``/``kdgraph bench``; ``scripts/train_teacher.sh``
trains it from scratch). Shipping writes the tensors unchanged (fp32) as safetensors with kdgraph's content
hash in the metadata, the cache's JSON side file (accuracy, settings) beside it, and the file's sha256 in
``kdgraph/models/pretrained/SHA256SUMS``, which :func:`kdgraph.weights.shipped` checks on every load.
``--check`` exits 0 when the two hold bit-identical tensors, 1 otherwise (printing both content hashes).
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import kdgraph
from kdgraph.weightio import content_hash, load_file, save_safetensors
from kdgraph.models.weights import shipped_dir, state_dict_of, weights_path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--role", default="teacher", choices=["teacher", "student"])
    ap.add_argument("--check", action="store_true", help="compare the cached network with the shipped one")
    args = ap.parse_args()
    spec = kdgraph.load_spec(args.spec)
    ref = getattr(spec, args.role)
    cached = weights_path(ref, spec, args.role)
    if cached is None or ref.pretrain is None:
        sys.exit(f"{args.spec}: {args.role}.weights is not a cache:NAME entry with a pretrain: section")
    target = shipped_dir() / f"{cached.stem}.safetensors"
    if not cached.is_file():
        sys.exit(f"{cached} does not exist: train it first (bash scripts/train_teacher.sh {args.spec})")
    sd = state_dict_of(load_file(cached, "cached network"))
    if args.check:
        theirs = content_hash(load_file(target, "shipped network")) if target.is_file() else "(none shipped)"
        ours = content_hash(sd)
        same = ours == theirs
        print(f"trained {cached}: content sha256 {ours}\nshipped {target}: content sha256 {theirs}\n"
              f"{'bit-identical' if same else 'DIFFERENT'}")
        return 0 if same else 1
    save_safetensors(sd, target)
    side = cached.with_suffix(".json")
    if side.is_file():
        shutil.copyfile(side, target.with_suffix(".json"))
    sums_path = shipped_dir() / "SHA256SUMS"
    sums = {}
    if sums_path.is_file():
        for line in sums_path.read_text().splitlines():
            digest, name = line.split()
            sums[name] = digest
    sums[target.name] = hashlib.sha256(target.read_bytes()).hexdigest()
    sums_path.write_text("".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))
    print(f"shipped {cached} -> {target} ({target.stat().st_size / 2**20:.1f} MiB, sha256 {sums[target.name]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
