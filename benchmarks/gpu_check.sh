#!/usr/bin/env bash
# The GPU checks, as one prepared script for a lent H100 (run from the repo root; $OUT collects results).
#   1. benchmarks/gpu_train.py: images/s of the KD and FT ImageNet specs, synthetic 224x224, bf16 +
#      channels_last, eager vs torch.compile (issue 4).
#   2. benchmarks/step_time.py on CUDA: the fused graph vs the hook-based eager loop for every method,
#      batch 64 at 224x224, bf16 + channels_last (issues 2 and 3; the CPU figures are the targets).
# The GPU image has its own torch; pydantic is carried as wheels in .whl/ (see README "Measured figures").
set -uo pipefail
OUT=${OUT:-/tmp/kdgraph-gpu}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
python3 benchmarks/gpu_train.py --budget-s ${TRAIN_BUDGET_S:-230} 2>&1 | tee "$OUT/gpu_train.txt"
python3 benchmarks/step_time.py --device cuda --batch 64 --size 224 --amp bf16 --channels-last --steps 8 --warmup 3 \
  --json "$OUT/step_time_cuda.json" 2>&1 | tee "$OUT/step_time_cuda.txt"
