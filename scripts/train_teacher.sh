#!/usr/bin/env bash
# Reproduce a shipped teacher from scratch, exactly as its spec's `pretrain:` section says, and compare it with the
# file in kdgraph/models/pretrained/ (bit for bit: same tensors or not).
#
#   bash scripts/train_teacher.sh                                   # the demo's teacher (specs/fashion_mnist/kd.yaml)
#   bash scripts/train_teacher.sh specs/fashion_mnist/tfkd.yaml     # Tf-KD's ResNet-18-shaped teacher
#   SHIP=1 bash scripts/train_teacher.sh                            # and replace the shipped file with the new one
#
# The teacher trains into a fresh cache folder ($KDGRAPH_CACHE, default runs/teacher_cache) with the shipped files
# ignored (KDGRAPH_SHIPPED_WEIGHTS=0); `kdgraph train` then trains one short student (1 epoch on 512 images,
# which does not change the teacher) because it has no teacher-only mode. Threads: OMP_NUM_THREADS (default 2,
# as the shipped files were made); bit-identical results need the same torch build, thread count and CPU kind.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SPEC=${1:-specs/fashion_mnist/kd.yaml}
export KDGRAPH_CACHE=${KDGRAPH_CACHE:-runs/teacher_cache} KDGRAPH_SHIPPED_WEIGHTS=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
name=$(basename "$SPEC" .yaml)
python -m kdgraph train "$SPEC" --out "runs/train_teacher/$name" --overwrite --no-progress \
  --set stages.main.epochs=1 --set data.train_subset=512 --set runtime.eval_teacher=false
if [ "${SHIP:-0}" = 1 ]; then
  python scripts/ship_teacher.py "$SPEC"
else
  python scripts/ship_teacher.py "$SPEC" --check
fi
