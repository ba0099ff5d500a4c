#!/usr/bin/env bash
# The GPU checks, as one prepared script for a lent H100/H200 (run from the repo root; $OUT collects results).
#   1. benchmarks/gpu_train.py: images/s and peak CUDA memory of the KD and FT ImageNet specs, batch 256,
#      synthetic 224x224, amp bf16 + channels_last (issue 4, extended): per spec eager, compiled
#      (runtime.compile: true), compiled + teacher cache (KD only; FT gets an "n/a" row: it reads teacher
#      features), compiled + teacher passes (fold_teacher_bn, teacher_channels_last, teacher_dtype bf16).
#      20 timed steps after 3 warm-up steps each (a step is ~25 ms on an H100, so the rows cost their
#      compilation, ~31 s each there); compile time reported separately. Its own --budget-s
#      (TRAIN_BUDGET_S, default 280 s) skips the configurations that would end after it, last ones first (the
#      passes rows), and `timeout` stops it at TRAIN_BUDGET_S + 140 s whatever happens; every finished
#      configuration is already in $OUT/gpu_train.jsonl.
#   2. benchmarks/step_time.py on CUDA: the fused graph vs the hook-based eager loop for every method,
#      batch 64 at 224x224, bf16 + channels_last (issues 2 and 3; the CPU figures are the targets).
#   3. benchmarks/step_time.py on CUDA, KD and FT at batch 256, 224x224, with the teacher passes on
#      (--fold --teacher-channels-last --teacher-dtype bf16) against the plain hand-written loop: eager only,
#      2 specs x 2 variants x 12 steps, ~30 s. Run only if the script is still under STEP_PASSES_BY_S (default
#      480 s) when it gets there. Every step's timeout is cut to what is left of END_BY_S (585 s), so the whole
#      command stays under the device's 10-minute limit.
#   4. benchmarks/gpu_fsdp.py under torchrun on every GPU of the machine (issue 24): FSDP2 vs DDP for
#      R34 -> R18 KD (batch 256, 224x224) and BERT-Large -> BERT-Base MRPC (batch 16, 128 tokens; random weights
#      when weights/glue/ is absent), bf16 autocast: images or sequences/s and peak memory per GPU (~2-3 min).
#      Runs if the script is under FSDP_BY_S (default 400 s) when it gets there; ONLY_FSDP=1 runs it alone
#      (steps 1-3 skipped: the way to get these rows in a lease of their own).
# Time plan for the 15-minute lease (machine start included): start ~2-4 min; here: setup ~15 s, 1. ~3.5 min
# (5 compilations of ~31-40 s, 2 eager rows; at most TRAIN_BUDGET_S + 140 s), 2. ~1 min, 3. ~0.5 min: about
# 5-6 min of command (at most 585 s), 8-10 min of lease. There is no room for a second full run:
# a rerun should pass e.g. TRAIN_BUDGET_S=120 or run one step alone.
# The GPU image has its own torch; pydantic is carried as wheels in .whl/ (see README "Measured figures").
set -uo pipefail
OUT=${OUT:-/tmp/kdgraph-gpu}; mkdir -p "$OUT"
TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-280}
STEP_PASSES_BY_S=${STEP_PASSES_BY_S:-480}
END_BY_S=${END_BY_S:-585}  # the device runs one command for at most 600 s
left() { local l=$((END_BY_S - SECONDS)); [ "$l" -lt 1 ] && l=1; [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }  # min(cap, time left), >= 1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"

FSDP_BY_S=${FSDP_BY_S:-400}
if [ "${ONLY_FSDP:-0}" != 1 ]; then
# 1. KD / FT throughput and peak memory: eager, compiled, compiled + cache, compiled + passes
timeout $((TRAIN_BUDGET_S + 140)) python3 benchmarks/gpu_train.py --budget-s "$TRAIN_BUDGET_S" --steps 20 --warmup 3 \
  2>&1 | tee "$OUT/gpu_train.txt"
echo "gpu_train exit ${PIPESTATUS[0]} at ${SECONDS} s" | tee -a "$OUT/gpu.txt"

# 2. fused graph vs hand-written loop, every method, batch 64
timeout "$(left 200)" python3 benchmarks/step_time.py --device cuda --batch 64 --size 224 --amp bf16 --channels-last \
  --steps 8 --warmup 3 --json "$OUT/step_time_cuda.json" 2>&1 | tee "$OUT/step_time_cuda.txt"
echo "step_time exit ${PIPESTATUS[0]} at ${SECONDS} s" | tee -a "$OUT/gpu.txt"

# 3. the teacher passes in step_time.py, KD and FT at batch 256 (the loop stays the plain hand-written one)
if [ "$SECONDS" -lt "$STEP_PASSES_BY_S" ]; then
  timeout "$(left 100)" python3 benchmarks/step_time.py --device cuda --specs kd ft --batch 256 --size 224 --amp bf16 \
    --channels-last --fold --teacher-channels-last --teacher-dtype bf16 --steps 8 --warmup 3 \
    --json "$OUT/step_time_cuda_passes.json" 2>&1 | tee "$OUT/step_time_cuda_passes.txt"
  echo "step_time passes exit ${PIPESTATUS[0]} at ${SECONDS} s" | tee -a "$OUT/gpu.txt"
else
  echo "step_time passes skipped: ${SECONDS} s spent, over STEP_PASSES_BY_S=${STEP_PASSES_BY_S}" | tee -a "$OUT/gpu.txt"
fi
fi

# 4. FSDP2 vs DDP per GPU (issue 24)
if [ "${ONLY_FSDP:-0}" = 1 ] || [ "$SECONDS" -lt "$FSDP_BY_S" ]; then
  NGPU=$(nvidia-smi -L | wc -l)
  timeout "$(left 300)" python3 -m torch.distributed.run --standalone --nproc_per_node="$NGPU" benchmarks/gpu_fsdp.py \
    --steps 10 --warmup 3 2>&1 | tee "$OUT/gpu_fsdp.txt"
  echo "gpu_fsdp exit ${PIPESTATUS[0]} at ${SECONDS} s" | tee -a "$OUT/gpu.txt"
else
  echo "gpu_fsdp skipped: ${SECONDS} s spent, over FSDP_BY_S=${FSDP_BY_S} (ONLY_FSDP=1 runs it alone)" | tee -a "$OUT/gpu.txt"
fi
