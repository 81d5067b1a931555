"""finetune stage: LoRA training with the scheme's fake quantizers in the forward pass."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from qatkit.backends.base import select_backend
from qatkit.core import distributed, interrupts
from qatkit.core.cache import cache_key, cache_lock, cache_root, code_fingerprint
from qatkit.core.io import DONE, is_done, publish_dir, read_json, read_jsonl, write_json_atomic
from qatkit.evaluation.variants import CONTROL_BASELINES
from qatkit.quant.hardware import require_hardware
from qatkit.recipe import Recipe
from qatkit.run.layout import FinetuneDir
from qatkit.run.records import TrainResult, TrainSummary
from qatkit.run.rundir import RunDir


def run(recipe: Recipe, run_dir: RunDir, work: Path, resume: bool = False) -> dict:
    with interrupts.deferred():  # Ctrl-C or SIGTERM stops training at a step boundary, with a checkpoint
        require_hardware(recipe.quant.scheme, "train")
        backend = select_backend(recipe)
        examples = read_jsonl(run_dir.train_data)
        files = FinetuneDir(work)
        control = None
        if needs_control_first(recipe):
            control = _control_run(recipe, backend, examples, files.control.root, resume)
        # the QAT run finished before the control was interrupted: not trained again
        result = TrainResult.load(files.qat_result) if resume else None
        if result is None:
            trained_control = files.control.trained(recipe.train.full_finetuning)
            result = backend.finetune(recipe, examples, work, resume, control=trained_control)
            if distributed.is_main():
                result.save(files.qat_result)
        if control is None and needs_control_run(recipe):
            control = _control_run(recipe, backend, examples, files.control.root, resume)
        summary = TrainSummary(backend=backend.name, **result.summary(), control=control)
        if distributed.is_main():
            summary.save(files.train_summary)
        return summary.to_dict()


def _control_run(recipe: Recipe, backend, examples: list[dict], target: Path, resume: bool) -> dict:
    """The "fine-tuned without QAT" control: same data, seed, order and steps, no fake quantization.

    It does not depend on the scheme, so it is trained once per (model, LoRA, training, data) and
    reused from the qatkit cache by every run that shares them (e.g. one run per scheme).
    Under a multi-process launcher every process trains it; the main process writes the cache.
    A resumed run keeps the copy it made when it started (its QAT run trained against that one), whatever the
    cache holds now: on a fresh machine (`qatkit unpack`) or after a code change, the control is not trained again.
    """
    summary_file = FinetuneDir(target).train_summary
    if resume and (kept := read_json(summary_file)) and "cache_key" in kept:
        return kept
    # settings left at their defaults are left out, so adding a setting does not retrain every cached control
    sections = [recipe.model, recipe.lora, recipe.train]
    key_parts = [*(s.model_dump(exclude_defaults=True) for s in sections), examples, backend.name, code_fingerprint()]

    if distributed.world_size() > 1:  # the global batch grows with the number of processes
        key_parts.append({"processes": distributed.world_size()})

    key = cache_key(key_parts)
    cached = cache_root() / "control" / key
    # another run on this machine training the same control holds the lock: wait for it, then reuse its result
    with cache_lock(cached) if distributed.is_main() else contextlib.nullcontext():
        distributed.barrier()  # every process sees the same cache state
        if not is_done(cached):
            tmp = cached.with_name(f"{key}.partial")
            tmp.mkdir(parents=True, exist_ok=True)
            result = backend.finetune(recipe, examples, tmp, resume, qat=False)
            if distributed.is_main():
                write_json_atomic(FinetuneDir(tmp).train_summary, result.summary())
                publish_dir(tmp, cached)
        distributed.barrier()

    summary = {**read_json(FinetuneDir(cached).train_summary), "cache_key": key}
    if distributed.is_main():
        shutil.copytree(cached, target, ignore=shutil.ignore_patterns(DONE), dirs_exist_ok=True)
        write_json_atomic(summary_file, summary)  # written last: the copy is complete
    return summary


def needs_control_first(recipe: Recipe) -> bool:
    """The QAT run learns from the control (its teacher) or starts from it."""
    teachers = (recipe.distill.teacher, recipe.distill.general_teacher) if recipe.distill else ()
    return "control" in teachers or recipe.qat.init_from != "base"


def needs_control_run(recipe: Recipe) -> bool:
    return bool(set(CONTROL_BASELINES) & set(recipe.eval.baselines))
