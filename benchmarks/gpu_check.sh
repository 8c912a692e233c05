#!/usr/bin/env bash
# On a machine with a CUDA GPU, from a fresh checkout: install, run the CUDA tests, time select_topk and
# the hook against torch.topk and a memory pass at 25M and 100M elements, check every exchange with
# several ranks sharing the GPU (gloo), and train the demo job for an epoch on the GPU.
# The numbers go to benchmarks/results/gpu_check.json (its "exchanges" rows from gpu_exchanges.py).
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
    .venv/bin/python -m pip install --quiet -e '.[test]'
fi
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
status=0
.venv/bin/python -m pytest -q tests/test_cuda.py || status=1
.venv/bin/python benchmarks/gpu_select.py "$@"
.venv/bin/python benchmarks/gpu_exchanges.py --output benchmarks/results/gpu_check.json || status=1
runs=$(mktemp -d)
.venv/bin/raytopk train --config jobs/mnist5k_topk.yaml --use-gpu --workers 1 --epochs 1 \
    --checkpoint-dir "$runs" --output "$runs/summary.json" || status=1
rm -rf "$runs"
exit $status
