#!/usr/bin/env bash
# kdgraph's main command: a real distillation run on real data, offline, on a CPU, in minutes.
#
#   scripts/demo.sh                    # from a fresh checkout: installs, then trains the students and prints the table
#   scripts/demo.sh --train-teacher    # also train the teacher from scratch instead of using the shipped one
#   scripts/demo.sh --fresh            # other arguments go to `kdgraph bench` (e.g. --fresh, --no-progress)
#
# 1. setup: creates .venv (if missing) and pip-installs kdgraph with its [train] extra (on a machine without an
#    NVIDIA GPU, the CPU build of torch first, when download.pytorch.org is reachable: the default wheel
#    carries ~3 GB of CUDA libraries); installs Debian's dataset-fashion-mnist if no Fashion-MNIST copy is found;
# 2. teacher: the ResNet-34-shaped teacher trained on all 60,000 images ships with kdgraph
#    (kdgraph/models/pretrained/, its sha256 checked on load); with --train-teacher it is trained from scratch into
#    $OUT/teacher_cache (scripts/train_teacher.sh, ~6 min on 2 cores) and compared bit for bit with the shipped one;
# 3. students: `kdgraph bench` on the baseline and KD rows of benchmarks/suites/fashion_mnist.yaml with 3 seeds:
#    3 students without distillation and 3 distilled ones on 5,000 labelled images (--jobs at a time);
# 4. table: mean, std, delta vs the baseline, written to $OUT/results.{md,tsv,png}.
#    Running it again reuses the finished runs (pass --fresh to train again).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${KDGRAPH_VENV:-.venv}
PYTHON=${PYTHON:-python3}
OUT=${KDGRAPH_DEMO_OUT:-runs/demo_fashion_mnist}
JOBS=${KDGRAPH_JOBS:-$(python3 -c 'import os; print(max(1, min(3, (os.cpu_count() or 1))))')}
start=$(date +%s)
TRAIN_TEACHER=0
BENCH_ARGS=()
for arg in "$@"; do
  if [ "$arg" = --train-teacher ]; then TRAIN_TEACHER=1; else BENCH_ARGS+=("$arg"); fi
done

say() { printf '\033[1m== %s\033[0m\n' "$*"; }
stage() { printf '\033[1m==== [%s] %s (%d s since start)\033[0m\n' "$(date +%H:%M:%S)" "$*" "$(( $(date +%s) - start ))"; }

stage "1/4 setup: Python environment and data"

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

if ! python -c "import kdgraph.train, torch, torchvision, tensorboard, matplotlib" >/dev/null 2>&1; then
  say "installing kdgraph[train] into $VENV"
  python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  if ! python -c "import torch" >/dev/null 2>&1 && ! command -v nvidia-smi >/dev/null 2>&1; then
    # CPU-only torch (~200 MB instead of ~3 GB); when that index is unreachable, PyPI's wheel below is used.
    python -m pip install --quiet --timeout 20 --retries 1 --index-url https://download.pytorch.org/whl/cpu \
      "torch==2.14.1" "torchvision==0.29.1" 2>/dev/null || say "CPU wheel index unreachable; using PyPI's torch"
  fi
  python -m pip install --quiet -c .ci/constraints.txt -e ".[train]"
fi

have_fashion() {
  [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] ||
    [ -f data/FashionMNIST/raw/train-images-idx3-ubyte ] || [ -f data/FashionMNIST/raw/train-images-idx3-ubyte.gz ]
}
if ! have_fashion; then
  say "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
  else
    echo "no apt-get here: put Fashion-MNIST's four IDX files under data/FashionMNIST/raw/ (torchvision's layout)" >&2
    exit 2
  fi
fi

setup_s=$(( $(date +%s) - start ))
say "setup took ${setup_s} s"

t=$(date +%s)
if [ "$TRAIN_TEACHER" = 1 ]; then
  stage "2/4 teacher: training the ResNet-34-shaped teacher from scratch (6 epochs on 60,000 images)"
  export KDGRAPH_CACHE="$OUT/teacher_cache" KDGRAPH_SHIPPED_WEIGHTS=0
  bash scripts/train_teacher.sh specs/fashion_mnist/kd.yaml ||
    say "scripts/train_teacher.sh exited non-zero (see above); the students use whatever teacher it left in $KDGRAPH_CACHE"
else
  stage "2/4 teacher: the shipped ResNet-34-shaped teacher (kdgraph/models/pretrained/)"
fi
python - <<'PY'
import json
import kdgraph
from kdgraph.errors import KDGraphError
from kdgraph.weightio import load_file
from kdgraph.weights import resolve
spec = kdgraph.load_spec("specs/fashion_mnist/kd.yaml")
try:
    resolve(spec, "teacher", require=True)  # the cache's file, else the shipped one (its sha256 checked)
    path = spec.teacher.weights
    load_file(path, "teacher")  # the content hash checked too
except KDGraphError as e:
    print(f"no trained teacher ({e}); kdgraph bench trains it first (~6 min on 2 cores)")
    raise SystemExit(0)
try:
    ev = json.load(open(path.rsplit(".", 1)[0] + ".json")).get("eval") or {}
except OSError:
    ev = {}
top1 = f"top-1 {ev['top1']:.2f}% on {ev.get('images', 10000)} test images" if "top1" in ev else "accuracy unknown"
print(f"teacher {spec.teacher.model}: {path} (sha256 checked), {top1}")
PY
say "teacher took $(( $(date +%s) - t )) s"

t=$(date +%s)
stage "3/4 students: 3 baseline + 3 KD runs, 5 epochs on 5,000 images each, $JOBS at a time"
python -m kdgraph bench benchmarks/suites/fashion_mnist.yaml --only baseline --only KD --seeds 3 --jobs "$JOBS" \
  --out "$OUT" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
say "students took $(( $(date +%s) - t )) s"

stage "4/4 table: $OUT/results.md (chart: $OUT/results.png, runs: $OUT/<label>/seed<k>/)"
cat "$OUT/results.md"
say "done in $(( $(date +%s) - start )) s (setup ${setup_s} s)"
