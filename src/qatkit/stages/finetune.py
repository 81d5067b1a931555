"""finetune stage: LoRA training with the scheme's fake quantizers in the forward pass."""

from __future__ import annotations

import json
from pathlib import Path

from qatkit import schemes
from qatkit.backends.base import select_backend
from qatkit.data import read_jsonl
from qatkit.pipeline import RunDir
from qatkit.recipe import Recipe


def run(recipe: Recipe, run_dir: RunDir, work: Path, resume: bool = False) -> dict:
    schemes.require_hardware(schemes.get_scheme(recipe.qat.scheme), "train")
    backend = select_backend(recipe)
    examples = read_jsonl(run_dir.root / "data" / "train.jsonl")
    result = backend.finetune(recipe, examples, work, resume)
    summary = {"backend": backend.name, **result.summary()}
    if needs_control_run(recipe):
        # the "fine-tuned without QAT" control: same data, seed, order and steps, no fake quantization
        control_dir = work / CONTROL
        control_dir.mkdir(exist_ok=True)
        control = backend.finetune(recipe, examples, control_dir, resume, qat=False)
        summary["control"] = control.summary()

    (work / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


CONTROL = "control"


def needs_control_run(recipe: Recipe) -> bool:
    return bool({"ft-bf16", "ft-ptq"} & set(recipe.eval.baselines))
