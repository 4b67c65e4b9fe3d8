#!/usr/bin/env bash
# On a CUDA machine: the CUDA tests (the Triton decode kernels at GPT-2 124M shapes among them), the
# Triton-vs-torch decode rows (bench/cuda_kernels.py: CUDA_KERNELS=triton and =torch, greedy and
# sampled, 1 and 32 clients, transformers beside them), then the benchmark on GPT-2 124M and 355M
# shapes, the TensorRT check (bench/tensorrt_check.py, where a route is installed) and a profile of the
# decode step (about 7 minutes in all; each stage has its own limit).
# Run bench/gpu_prepare.sh here first, then (device tool):
#   run(command="bash bench/gpu_check.sh", carry=[".gpu-carry"], timeout_s=600)
# SHAPES=gpt2-124M narrows the benchmark. The JSON and the log land in $OUT when the tool sets it.
# DEVICE=cpu is a dry run of this script on a machine without a GPU (the CUDA tests skip; a quick
# benchmark on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1
if compgen -G ".gpu-carry/wheels/*.whl" >/dev/null; then  # what the GPU image lacks (gpu_prepare.sh)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-site .gpu-carry/wheels/*.whl
    export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .gpu-carry/tiktoken-cache ] && export TIKTOKEN_CACHE_DIR=$PWD/.gpu-carry/tiktoken-cache
[ -f .gpu-carry/commit ] && export BENCH_COMMIT=$(cat .gpu-carry/commit)
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
if [ "$DEVICE" = cuda ]; then
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: nothing to check")'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    BENCH=(--device cuda --shapes "${SHAPES:-gpt2-124M,gpt2-355M}" --clients 1,8,32 --no-demo)
else
    BENCH=(--device cpu --quick --shapes gpt2-124M --dtypes float32 --clients 1,4 --no-demo)
fi
"$PY" -c 'import torch; print("torch", torch.__version__)'
"$PY" -c 'import triton; print("triton", triton.__version__)' || echo "triton not importable: CUDA_KERNELS=triton is not measured"
# -m gpu: the CUDA engine tests, the Triton kernels' at real shapes, and the CUDA checkpoint load;
# they skip without CUDA. Triton compiles each kernel variant on first use (seconds each).
# A failing test does not stop the benchmark (its figures are wanted either way); the exit status tells.
# Each stage has its own time limit, so that one that hangs still leaves the other's output.
tests=0 bench=0
timeout 240 "$PY" -m pytest tests/engine/test_engine_cuda.py tests/kernels/test_triton_decode.py \
    tests/kernels/test_triton_sampling.py tests/kernels/test_triton_int8.py tests/model/test_checkpoint.py \
    -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUTDIR/gpu-check-tests.log" || tests=$?
if [ "$DEVICE" = cuda ]; then  # issue 22's targets: batch 1 >= 3000 tok/s (124M bf16), sampled within 10% of greedy
    timeout 200 "$PY" -m bench.cuda_kernels --shape gpt2-124M --dtype bfloat16 --clients 1,32 \
        --out "$OUTDIR/gpu-cuda-kernels.json" > "$OUTDIR/gpu-cuda-kernels.log" 2>&1 || echo "cuda_kernels bench FAILED"
    grep -A 13 "^## CUDA_KERNELS" "$OUTDIR/gpu-cuda-kernels.log" || tail -n 20 "$OUTDIR/gpu-cuda-kernels.log"
fi
timeout 300 "$PY" -m bench.run "${BENCH[@]}" --out "$OUTDIR/gpu-check.json" 2>&1 | tee "$OUTDIR/gpu-check-bench.log" \
    | tail -n 40 || { bench=$?; echo "benchmark FAILED (exit $bench): see $OUTDIR/gpu-check-bench.log"; }
if [ "$DEVICE" = cuda ]; then  # issue 20's optional TensorRT path, where onnxruntime-gpu or torch_tensorrt is installed
    timeout 120 "$PY" -m bench.tensorrt_check --shape gpt2-124M --out "$OUTDIR/gpu-tensorrt.json" \
        > "$OUTDIR/gpu-tensorrt.log" 2>&1 || echo "tensorrt check FAILED"
    grep -E '"(skipped|error|rel|ok)"' "$OUTDIR/gpu-tensorrt.json" | head -n 12 || tail -n 12 "$OUTDIR/gpu-tensorrt.log"
fi
if [ "$DEVICE" = cuda ]; then  # where a step's time goes: the graph alone vs the engine thread's Python
    timeout 90 "$PY" -m bench.profile --clients 1,32 > "$OUTDIR/gpu-profile.log" 2>&1 || echo "profile FAILED"
    grep -A 8 "^## batch" "$OUTDIR/gpu-profile.log" || true
fi
[ "$tests" = 0 ] || echo "CUDA tests FAILED (exit $tests): see $OUTDIR/gpu-check-tests.log"
exit $(( tests != 0 ? tests : bench ))
