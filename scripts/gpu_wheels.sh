#!/usr/bin/env bash
# Fetch (on a machine that reaches PyPI) what a CUDA machine without network needs on top of an image that has
# torch 2.11 (CUDA 13), transformers and peft for Python 3.12, to run scripts/gpu_check.sh: torchao, mslk (the
# CUDA int4 kernels int4 and fp8-int4 convert with; mslk-cuda 1.1.0 is the release for torch 2.11) and pydantic.
# About 51 MB. Usage: bash scripts/gpu_wheels.sh [DEST]   (default .whl, ignored by git)
set -euo pipefail
dest=${1:-.whl}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$dest" torchao==0.18.0 mslk-cuda==1.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5
du -sh "$dest"
