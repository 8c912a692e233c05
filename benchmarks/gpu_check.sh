#!/usr/bin/env bash
# On a machine with a CUDA GPU, from a fresh checkout: run the CUDA tests, time select_topk and the hook
# against torch.topk and a memory pass at 25M and 100M elements, check every exchange with several ranks
# sharing the GPU (gloo), and train on the GPU for an epoch.
# The numbers go to benchmarks/results/gpu_check.json (its "exchanges" rows from gpu_exchanges.py).
#   bash benchmarks/gpu_check.sh [gpu_select.py's flags]
# Python: the project's .venv where `make` built one; else $PYTHON (default python3) with this checkout on
# PYTHONPATH, as on a GPU image that has PyTorch but no network to install into (Ray is then optional:
# without it the epoch runs under torchrun instead of `raytopk train`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=${PYTHON:-python3}
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
status=0
# The rows of several ranks sharing the GPU come from gpu_exchanges.py below, once.
"$PY" -m pytest -q tests/test_cuda.py -k "not ranks_sharing_the_gpu" || status=1
"$PY" benchmarks/gpu_select.py "$@" || status=1
"$PY" benchmarks/gpu_exchanges.py --output benchmarks/results/gpu_check.json || status=1
runs=$(mktemp -d)
if "$PY" -c "import ray" 2>/dev/null; then
    "$PY" -m raytopk train --config jobs/mnist5k_topk.yaml --use-gpu --workers 1 --epochs 1 \
        --checkpoint-dir "$runs" --output "$runs/summary.json" || status=1
else
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 examples/torchrun_ddp.py --epochs 1 || status=1
fi
rm -rf "$runs"
exit $status
