"""Deployment files made from a converted run, one module per format (`FORMATS`), into `<run>/export/`.

A format's module has `export(model, recipe, out_dir, sequences) -> record` (it writes its files and a record of
them into `out_dir`) and `gate(record)` (raises GateError when the file is not the trained model).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from qatkit.core.io import atomic_dir
from qatkit.recipe import Recipe
from qatkit.run.rundir import RunDir

FORMATS = {"gguf": "qatkit.export.gguf"}


def export_run(recipe: Recipe, run_dir: RunDir, model, sequences: list[list[int]], formats: list[str]) -> dict:
    """Write every format in `formats` from the converted `model`; `sequences` (token ids) are the parity batch.
    The folder is published whole (with the records) before the gates run, so a failed gate leaves it to inspect."""
    modules = {name: importlib.import_module(FORMATS[name]) for name in formats}
    with atomic_dir(run_dir.export.root) as work:
        records = {name: module.export(model, recipe, Path(work), sequences) for name, module in modules.items()}
    summary = {name: record.to_dict() for name, record in records.items()}
    run_dir.update_manifest(export=summary)
    for name, module in modules.items():
        module.gate(records[name])
    return summary


def parity_sequences(batch) -> list[list[int]]:
    """The unpadded token ids of a tokenized batch."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
