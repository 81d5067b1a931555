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
    (work / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
