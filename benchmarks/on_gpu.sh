#!/usr/bin/env bash
# Every benchmark a GPU machine is lent for, in one prepared run (about 10 minutes on an H100
# or H200), then the speed table's row for it:
#   bash benchmarks/on_gpu.sh "NVIDIA H200 (host: 16-core Xeon)"
# Needs the CUDA build of JAX (pip install -e ".[cuda12]" or ".[cuda13]") and, for the peers,
# Keras 3 and PyTorch (pip install -e ".[peers]"; TensorFlow is optional there). Writes
# bench-results/gpu/{results.json,benchmarks.png,sweeps.json} and adds the row to
# docs/speed.json; commit those with the docs/ copies of the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
machine=${1:?give the machine as the table should name it, e.g. "NVIDIA H200"}
out=bench-results/gpu
mkdir -p "$out"
python -c 'import jax; assert jax.default_backend() == "gpu", jax.devices()'
# The study beside the peers, one model's epoch, and stacks of 1 to 1024 models.
python -m benchmarks --peers --only-peers keras-jax,keras-tensorflow,torch-eager,torch-compile \
    --skip step,sweep,scaling --out "$out"
# A 16-configuration sweep beside Keras Tuner, and stacks of 16 to 1024 sweep models.
python -m benchmarks.sweeps --peer --models 16,64,256,1024 --out "$out/sweeps.json"
cp "$out/results.json" "docs/benchmarks-gpu-$(date +%Y%m%d).json"
python -m benchmarks.table --add "docs/benchmarks-gpu-$(date +%Y%m%d).json" --machine "$machine"
