"""finetune stage: LoRA training with the scheme's fake quantizers in the forward pass."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

from qatkit import distributed, interrupts, progress, schemes
from qatkit.backends.base import TrainResult, select_backend, trained_dir
from qatkit.data import read_jsonl
from qatkit.pipeline import RunDir
from qatkit.recipe import Recipe


def run(recipe: Recipe, run_dir: RunDir, work: Path, resume: bool = False) -> dict:
    # Ctrl-C stops training at a step boundary, with a checkpoint; model-loading and data-prep bars off (not --verbose)
    with interrupts.deferred(), progress.quiet_library_bars():
        schemes.require_hardware(schemes.for_recipe(recipe.qat), "train")
        backend = select_backend(recipe)
        examples = read_jsonl(run_dir.root / "data" / "train.jsonl")
        control = None
        if needs_control_first(recipe):
            control = _control_run(recipe, backend, examples, work / CONTROL, resume)
        finished = work / QAT_RESULT  # the QAT run finished before the control was interrupted: not trained again
        if resume and finished.exists():
            result = TrainResult(**json.loads(finished.read_text()))
        else:
            result = backend.finetune(recipe, examples, work, resume, control=trained_dir(recipe, work / CONTROL))
            if distributed.is_main():
                finished.write_text(json.dumps(result.__dict__))
        summary = {"backend": backend.name, **result.summary()}
        if control is None and needs_control_run(recipe):
            control = _control_run(recipe, backend, examples, work / CONTROL, resume)
        if control is not None:
            summary["control"] = control
        if distributed.is_main():
            (work / "train_summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _control_run(recipe: Recipe, backend, examples: list[dict], target: Path, resume: bool) -> dict:
    """The "fine-tuned without QAT" control: same data, seed, order and steps, no fake quantization.

    It does not depend on the scheme, so it is trained once per (model, LoRA, training, data) and
    reused from the qatkit cache by every run that shares them (e.g. one run per scheme).
    Under a multi-process launcher every process trains it; the main process writes the cache.
    """
    from qatkit.loading import cache_lock, cache_root, code_fingerprint

    # settings left at their defaults are left out, so adding a setting does not retrain every cached control
    sections = [recipe.model, recipe.lora, recipe.train]
    key_parts = [*(s.model_dump(exclude_defaults=True) for s in sections), examples, backend.name, code_fingerprint()]

    if distributed.world_size() > 1:  # the global batch grows with the number of processes
        key_parts.append({"processes": distributed.world_size()})

    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    cached = cache_root() / "control" / key
    # another run on this machine training the same control holds the lock: wait for it, then reuse its result
    with cache_lock(cached) if distributed.is_main() else contextlib.nullcontext():
        distributed.barrier()  # every process sees the same cache state
        if not (cached / "DONE").exists():
            tmp = cached.with_name(f"{key}.partial")
            tmp.mkdir(parents=True, exist_ok=True)
            result = backend.finetune(recipe, examples, tmp, resume, qat=False)
            if distributed.is_main():
                (tmp / "train_summary.json").write_text(json.dumps(result.summary(), indent=2))
                (tmp / "DONE").touch()
                if cached.exists():
                    shutil.rmtree(cached)
                tmp.rename(cached)
        distributed.barrier()

    if distributed.is_main():
        shutil.copytree(cached, target, ignore=shutil.ignore_patterns("DONE"), dirs_exist_ok=True)
    return {**json.loads((cached / "train_summary.json").read_text()), "cache_key": key}


CONTROL = "control"
QAT_RESULT = "qat_result.json"


def needs_control_first(recipe: Recipe) -> bool:
    """The QAT run learns from the control (its teacher) or starts from it."""
    return bool(recipe.distill and recipe.distill.teacher == "control") or recipe.qat.init_from == "control"


def needs_control_run(recipe: Recipe) -> bool:
    return bool({"ft-bf16", "ft-ptq"} & set(recipe.eval.baselines))
