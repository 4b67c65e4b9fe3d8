#!/usr/bin/env bash
# Here (with network), before a session's one GPU call: put into .gpu-carry/ what the GPU
# machine lacks and cannot fetch (it reaches no network): the wheel of pytest-asyncio (the
# CUDA engine tests are async; its image has torch, transformers, tiktoken, pytest and
# pytest-timeout) and tiktoken's GPT-2 data. Then, with the device tool:
#   run(command="bash bench/gpu_check.sh", carry=[".gpu-carry"], timeout_s=420)
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
rm -rf "$CARRY" && mkdir -p "$CARRY/wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$CARRY/wheels" \
    "pytest-asyncio==1.5.0"
SHARED=${SHARED:-../shared}
cp -r "$SHARED/tokenizers/tiktoken-cache" "$CARRY/tiktoken-cache"
# the copy on the GPU machine has no .git: the report names the commit from here (bench/run.py)
bench_commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && bench_commit="$bench_commit+changes"
echo "$bench_commit" > "$CARRY/commit"
du -sh "$CARRY"
