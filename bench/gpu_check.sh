#!/usr/bin/env bash
# On a CUDA machine: the CUDA tests, then the benchmark on GPT-2 124M and 355M shapes (< 5 minutes).
# Usage: bench/gpu_check.sh   (from the repository root, with the project's venv active or at .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: nothing to check")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -m pytest tests/engine/test_engine_cuda.py -q -m gpu -p no:cacheprovider
"$PY" -m bench.run --device cuda --shapes gpt2-124M,gpt2-355M --clients 1,8,32 --no-demo \
    --out bench/results/gpu-check.json 2>&1 | tail -n 40
