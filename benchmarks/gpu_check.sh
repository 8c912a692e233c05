#!/usr/bin/env bash
# On a machine with a CUDA GPU, from a fresh checkout: install, run the CUDA tests, then time
# select_topk and the hook against torch.topk and a memory pass at 25M and 100M elements.
# The table comes last; the numbers go to benchmarks/results/gpu_check.json.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
    .venv/bin/python -m pip install --quiet -e '.[test]'
fi
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
.venv/bin/python -m pytest -q tests/test_cuda.py
.venv/bin/python benchmarks/gpu_select.py "$@"
