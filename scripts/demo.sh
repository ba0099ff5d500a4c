#!/usr/bin/env bash
# kdgraph's main command: a real distillation run on real data, offline, on a CPU, in minutes.
#
#   scripts/demo.sh                    # from a fresh checkout: installs, then trains and prints the table
#   scripts/demo.sh --fresh            # extra arguments go to `kdgraph bench` (e.g. --fresh, --no-progress)
#
# 1. creates .venv (if missing) and pip-installs kdgraph with its [train] extra (on a machine without an
#    NVIDIA GPU, the CPU build of torch first, when download.pytorch.org is reachable: the default wheel
#    carries ~3 GB of CUDA libraries);
# 2. installs Debian's dataset-fashion-mnist package if no Fashion-MNIST copy is found;
# 3. runs `kdgraph bench` on the baseline and KD rows of benchmarks/suites/fashion_mnist.yaml with 3 seeds: the
#    ResNet-34-shaped teacher is trained once on all 60,000 images and cached in ~/.cache/kdgraph, then 3 students
#    without distillation and 3 distilled ones train on 5,000 labelled images (--jobs at a time), and the table
#    (mean, std, delta vs the baseline) is printed and written to runs/demo_fashion_mnist/results.{md,tsv,png}.
#    Running it again reuses the finished runs (pass --fresh to train again).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${KDGRAPH_VENV:-.venv}
PYTHON=${PYTHON:-python3}
OUT=${KDGRAPH_DEMO_OUT:-runs/demo_fashion_mnist}
JOBS=${KDGRAPH_JOBS:-$(python3 -c 'import os; print(max(1, min(3, (os.cpu_count() or 1))))')}
start=$(date +%s)

say() { printf '\033[1m== %s\033[0m\n' "$*"; }

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

say "training (setup took $(( $(date +%s) - start )) s)"
python -m kdgraph bench benchmarks/suites/fashion_mnist.yaml --only baseline --only KD --seeds 3 --jobs "$JOBS" \
  --out "$OUT" "$@"
say "done in $(( $(date +%s) - start )) s; table: $OUT/results.md, chart: $OUT/results.png, runs: $OUT/<label>/seed<k>/"
