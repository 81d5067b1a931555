#!/usr/bin/env bash
# The GPU checks in one command, for a CUDA machine (no network needed): the GPU tests (CUDA converts, the int4
# card recipe on a tiny Qwen3 with the hf and the unsloth backend), then the Qwen3-8B architecture with random
# weights, bf16 vs the cards' int4: checkpoint size, decode latency and peak memory.
# Wheels in .whl/ and .whl-unsloth/ and the packed mslk in .whl-mslk/ (scripts/gpu_wheels.sh) are installed first,
# into one folder, for an image that lacks qatkit's dependencies.
# Results go to $OUT (default: gpu-check/).
# Usage: bash scripts/gpu_check.sh                 (all GPU tests, then the bench)
#        bash scripts/gpu_check.sh TEST_PATH...    (only these tests, no bench)
set -uo pipefail
out=${OUT:-gpu-check}
site=/tmp/qatkit-site
mkdir -p "$out"
mkdir -p "$site"
for packed in .whl-mslk/*.tar.xz; do
  [ -e "$packed" ] && tar -C "$site" -xJf "$packed"
done
for set in .whl .whl-unsloth; do
  if compgen -G "$set/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$set"/*.whl 2>&1 | grep -v "already exists" || true
  fi
done
export PYTHONPATH=$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export UNSLOTH_DISABLE_STATISTICS=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m pip list 2>/dev/null | grep -iE "^(torch|torchao|transformers|peft|trl|datasets|unsloth|unsloth.zoo|bitsandbytes|mslk.cuda) " \
  | tee -a "$out/gpu.txt"
python3 -m pytest -q -rs -p no:cacheprovider "${@:-tests/gpu}" 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
bench=0
if [ $# -eq 0 ]; then
  python3 -m qatkit bench perf --arch configs/arch/qwen3-8b.json --schemes int4 --sections checkpoint_size,decode_latency \
    --out "$out/qwen3-8b-random" 2>&1 | tee "$out/bench.log"
  bench=${PIPESTATUS[0]}
fi
exit $((tests || bench))
