#!/usr/bin/env bash
# The GPU checks in one command, for a CUDA machine (no network needed): the GPU tests, then the Qwen3-8B
# architecture with random weights, bf16 vs the cards' int4: checkpoint size, decode latency and peak memory.
# Wheels in .whl/ (scripts/gpu_wheels.sh) are installed first, for an image that lacks qatkit's dependencies.
# Results go to $OUT (default: gpu-check/). Usage: bash scripts/gpu_check.sh
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qatkit-site \
    .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/qatkit-site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -rs tests/gpu 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
python3 -m qatkit bench perf --arch configs/arch/qwen3-8b.json --schemes int4 --sections checkpoint_size,decode_latency \
  --out "$out/qwen3-8b-random" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
exit $((tests || bench))
