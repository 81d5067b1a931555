#!/usr/bin/env bash
# Fetch (on a machine that reaches PyPI) what a CUDA machine without network needs on top of an image that has
# torch 2.11 (CUDA 13), transformers 5.17 and peft for Python 3.12, to run scripts/gpu_check.sh.
#   .whl/          torchao, pydantic, trl, datasets, gguf                                              ~7 MB
#   .whl-mslk/     mslk, the CUDA int4 kernels int4 and fp8-int4 convert with (mslk-cuda 1.1.0 is the
#                  release for torch 2.11), installed and xz-compressed: its 254 MB fat binary is 44 MB
#                  as a wheel, 12 MB as .tar.xz                                                      ~12 MB
#   .whl-unsloth/  Unsloth, bitsandbytes (the cards' adamw_8bit) and what they need beyond that       ~13 MB
# Together with the working tree they fit the 64 MiB a device call carries.
# trl/datasets are the newest releases Unsloth 2026.10 accepts (trl <= 1.15, datasets < 5); bitsandbytes and
# unsloth are repacked without what a CUDA 13 training run never loads (other CUDA/ROCm builds of the
# bitsandbytes library; Unsloth Studio's web UI), which takes them from 43 and 29 MB to a few.
# Usage: bash scripts/gpu_wheels.sh
set -euo pipefail
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$@"
}
download .whl torchao==0.18.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 trl==1.15.0 datasets==4.8.5 dill==0.4.0 multiprocess==0.70.18 gguf==0.19.0
download .whl-unsloth bitsandbytes==0.50.2 unsloth==2026.10.9 unsloth-zoo==2026.10.9 cut-cross-entropy==25.1.1 tyro==1.0.17 \
  docstring-parser==0.17.0 typeguard==4.4.4 msgspec==0.23.0
python3 - .whl-unsloth/bitsandbytes-*.whl .whl-unsloth/unsloth-2*.whl <<'EOF'
"""Repack a wheel without the files a CUDA 13 training run never loads (and drop them from its RECORD)."""
import re, sys, zipfile
from pathlib import Path

UNUSED = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[0-2]\d|rocm)\d*\.so$|^studio/")
for wheel in map(Path, sys.argv[1:]):
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if UNUSED.search(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                rows = data.decode().splitlines(keepends=True)
                data = "".join(r for r in rows if not UNUSED.search(r.split(",")[0])).encode()
            dst.writestr(item, data)
    slim.replace(wheel)
EOF
download .whl-mslk mslk-cuda==1.1.0
rm -rf .whl-mslk/tree && python3 -m zipfile -e .whl-mslk/mslk_cuda-*.whl .whl-mslk/tree
tar -C .whl-mslk/tree -cf - . | xz -T0 -6 > .whl-mslk/mslk-cuda-1.1.0.tar.xz
rm -rf .whl-mslk/tree .whl-mslk/*.whl
du -sh .whl .whl-mslk .whl-unsloth
