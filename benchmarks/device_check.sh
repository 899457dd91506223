#!/usr/bin/env bash
# Every GPU figure the README promises, in one run on a GPU machine (budget: under 8 minutes):
#   VAE images/s and the time of one 60k-image epoch (batch 128 and 1024), exam responses/s
#   (100k students x 50 items), ProdLDA documents/s (DBLP) -- each beside the same network and
#   ELBO written in plain PyTorch (benchmarks/throughput.py).
#
# 1. Here (a machine with pip, the Fashion-MNIST package and ../shared):
#        bash benchmarks/device_check.sh --prepare
#    fills .device/ (ignored by git): pyro-ppl wheels, the Fashion-MNIST idx files, DBLP.
# 2. On the GPU machine (the device tool carries .device/):
#        bash benchmarks/device_check.sh            # writes $OUT (or device_out/) and prints
#    Record the printed tables in benchmarks/RESULTS.md with the machine's name.
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=.device

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$HERE/wheels" "$HERE/fashion-mnist" "$HERE/topics"
  grep -qx "/$HERE/" .git/info/exclude 2>/dev/null || echo "/$HERE/" >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$HERE/wheels" \
    "pyro-ppl>=1.9,<2" "pyro-api>=0.1.1"
  cp /usr/share/datasets/fashion-mnist/*-ubyte.gz "$HERE/fashion-mnist/"
  cp -r ../shared/data/topics/DBLP "$HERE/topics/"
  du -sh "$HERE"
  exit 0
fi

OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import pyro" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$HERE"/wheels/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null  # offline: the tree
export PPL_VAE_DATA=$PWD/$HERE/fashion-mnist
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__)"

# VAE (60k images, batch 128 and 1024), exam (100k x 50), ProdLDA (DBLP): ~4 minutes
timeout 330 python3 benchmarks/throughput.py --device cuda --repeats 3 \
  --corpus "$HERE/topics/DBLP" 2>&1 | tee "$OUT/throughput.txt"
echo "device check done: $OUT"
