"""Export a run's converted model to deployment formats, into <run>/export/ (`qatkit export`, or a recipe's
`export.formats` after convert). Each format is one module here; the export dir is published atomically, the files
of formats not being exported kept as they were."""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qatkit.core.errors import RecipeError
from qatkit.core.io import DONE, atomic_dir
from qatkit.recipe import Recipe
from qatkit.run.rundir import RunDir

FORMATS = ("gguf", "executorch")


@contextmanager
def export_work(run: RunDir, owned: tuple[str, ...]) -> Iterator[Path]:
    """A work dir holding copies of <run>/export/'s files but `owned`; on success it replaces <run>/export/."""
    target = run.export.root
    with atomic_dir(target) as work:
        if target.exists():
            for f in target.iterdir():
                if f.is_file() and f.name not in (*owned, DONE):
                    shutil.copy2(f, work / f.name)
        yield work


def export_run(run_dir: Path, fmt: str, **options) -> dict:
    """Export the finished convert stage of `run_dir` to `fmt` (options: the format's recipe settings to override;
    None: the recipe's)."""
    if fmt not in FORMATS:
        raise RecipeError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    run = RunDir(run_dir.resolve())
    if not run.manifest_path.exists():
        raise RecipeError(f"{run_dir}: not a qatkit run dir (no manifest.json)")
    if not run.is_done("convert"):
        raise RecipeError(f"{run_dir}: no finished convert stage to export (run `qatkit convert` first)")
    recipe = Recipe.model_validate(run.manifest()["recipe"])
    given = {name: value for name, value in options.items() if value is not None}
    return importlib.import_module(f"qatkit.export.{fmt}").export(run, recipe, **given)


def parity_sequences(tokenizer, run: RunDir, recipe: Recipe, max_len: int | None = None) -> list[list[int]]:
    """The convert stage's parity texts (the run's held-out items, else fixed texts) as token ids, each cut to
    `max_len` tokens when given: what every format's engine is compared with the converted model on."""
    from qatkit.stages.convert import parity_batch

    batch = parity_batch(tokenizer, run, recipe)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    return [ids[:max_len] for ids in rows]
