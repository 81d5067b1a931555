"""`qatkit run`: the recipe's stages in order in one run dir (skipping finished ones on --resume), then the report."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from qatkit.core import distributed, progress
from qatkit.core.env import device_description, package_versions
from qatkit.core.errors import RecipeError
from qatkit.core.io import is_done, publish_dir, write_json_atomic
from qatkit.data import load_splits, write_splits
from qatkit.export import export_run
from qatkit.models.loading import model_fingerprint
from qatkit.recipe import Recipe
from qatkit.report.build import build_report
from qatkit.run.rundir import RunDir, open_run_dir

StageFn = Callable[[Recipe, RunDir, Path, bool], dict]
STAGE_NEEDS = {"convert": ["finetune"], "eval": ["convert"]}  # when the recipe has that stage


def run_stage(run: RunDir, name: str, fn: StageFn, recipe: Recipe, *, resume: bool) -> dict:
    """One stage in its atomic work dir; the libraries' own progress bars are off (qatkit shows its own)."""
    with run.atomic_stage(name, resume=resume) as work, progress.quiet_library_bars():
        summary = fn(recipe, run, work, resume)
        if distributed.is_main():
            write_json_atomic(work / "stage.json", {"stage": name, "summary": summary, "versions": package_versions()})
    if distributed.is_main():
        run.update_manifest(stages={name: {"summary": summary}})
    return summary


def prepare_data(recipe: Recipe, run: RunDir) -> dict | None:
    """Split the recipe's data once per run dir (train / held-out), recorded with a hash."""
    if recipe.data is None:
        return None
    if is_done(run.data):
        return run.manifest().get("data")
    tmp = run.root / ".data.partial"
    info = write_splits(load_splits(recipe.data), tmp, recipe.data.answer_style)
    publish_dir(tmp, run.data)
    run.update_manifest(data={"source": " + ".join(s.path for s in recipe.data.sources), **info})
    return info


def stage_function(name: str) -> StageFn:
    return importlib.import_module(f"qatkit.stages.{name}").run


def _check_prerequisites(recipe: Recipe, out: Path, stages: list[str], force: bool) -> None:
    """A stage that needs another one's output (convert: finetune's) finds it finished, or runs it too."""
    for name in stages:
        for needed in STAGE_NEEDS.get(name, []):
            done = not force and RunDir(out.resolve()).is_done(needed)
            if needed in recipe.stages and needed not in stages and not done:
                raise RecipeError(
                    f"stage {name} needs a finished {needed} stage in {out.resolve()}; run `qatkit {needed}` first"
                )


def _open(recipe: Recipe, out: Path, stages: list[str], *, resume: bool, force: bool, single: bool) -> None:
    """The main process creates or reopens the run dir and records what the run starts from."""
    reuse = single and RunDir(out.resolve()).manifest_path.exists()
    run = open_run_dir(out, recipe, resume=resume or reuse, force=force, same_recipe=not reuse)
    prepare_data(recipe, run)
    if "model" not in run.manifest():
        run.update_manifest(model=model_fingerprint(recipe.model.name_or_path), device=device_description())
    if "finetune" in stages:
        run.update_manifest(training_processes=distributed.world_size())


def run_recipe(
    recipe: Recipe,
    out: Path,
    *,
    resume: bool = False,
    force: bool = False,
    only: list[str] | None = None,
    on_stage: Callable[[str, str], None] | None = None,
) -> RunDir | None:
    """Run the recipe's stages (or `only` some of them) in `out`, then its export formats (all stages only), then
    rebuild the report.

    Under a multi-process launcher every process trains; the others then return None and the main
    process runs the remaining stages alone.
    """
    distributed.init()
    single = only is not None
    stages = only or recipe.stages
    _check_prerequisites(recipe, out, stages, force)  # before anything is written
    if distributed.is_main():
        _open(recipe, out, stages, resume=resume, force=force, single=single)
    distributed.barrier()
    run = RunDir(out.resolve())
    for name in stages:
        if name != "finetune" and distributed.leave():
            return None
        if resume and not single and run.is_done(name):
            on_stage and on_stage(name, "skipped (done)")
            continue
        on_stage and on_stage(name, "running")
        run_stage(run, name, stage_function(name), recipe, resume=resume)
        on_stage and on_stage(name, "done")
    if distributed.leave():
        return None
    if not single:
        for fmt in recipe.export.formats:
            on_stage and on_stage(f"export {fmt}", "running")
            export_run(run.root, fmt)
            on_stage and on_stage(f"export {fmt}", "done")
    build_report(run)
    return run
