"""A run directory's state: atomic stages with DONE markers, resume, and the manifest (see `run.layout` for the files)."""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qatkit.core import distributed
from qatkit.core.env import host_description, package_versions, peak_memory_mb
from qatkit.core.errors import Interrupted, RecipeError
from qatkit.core.io import is_done, publish_dir, read_json, write_json_atomic
from qatkit.recipe import Recipe, dump_recipe
from qatkit.run.layout import RunLayout


def _deep_merge(base: dict, updates: dict) -> dict:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


@dataclass(frozen=True)
class RunDir(RunLayout):
    """A run directory on disk: its layout plus the manifest and the stages' state."""

    def is_done(self, name: str) -> bool:
        return is_done(self.stage(name))

    def manifest(self) -> dict:
        return read_json(self.manifest_path) or {}

    def update_manifest(self, **updates) -> dict:
        data = _deep_merge(self.manifest(), updates)
        write_json_atomic(self.manifest_path, data)
        return data

    @contextmanager
    def atomic_stage(self, name: str, resume: bool):
        """Yield a work dir; on success it is marked DONE and renamed to <root>/<name>.

        A stage killed half-way leaves only `.<name>.partial`, which never looks finished; `resume`
        keeps it (its checkpoints), otherwise it is wiped.
        """
        work = self.partial(name)
        if not distributed.is_main():  # the main process owns the stage's files; the others train into it
            distributed.barrier()
            yield work
            distributed.barrier()
            return
        if work.exists() and not resume:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        started = time.time()
        self.update_manifest(stages={name: {"status": "running", "started": started}})
        distributed.barrier()
        try:
            yield work
        except BaseException as e:
            self.update_manifest(
                stages={
                    name: {
                        "status": "interrupted" if isinstance(e, (KeyboardInterrupt, Interrupted)) else "failed",
                        "error": f"{type(e).__name__}: {e}"[:500],
                    }
                }
            )
            raise
        distributed.barrier()
        publish_dir(work, self.stage(name), durable=True)
        self.update_manifest(
            stages={
                name: {"status": "done", "seconds": round(time.time() - started, 2), "peak_memory": peak_memory_mb()}
            }
        )


def open_run_dir(out: Path, recipe: Recipe, *, resume: bool, force: bool, same_recipe: bool = True) -> RunDir:
    """Create (or reopen with --resume, or replace with --force) a run directory.

    `same_recipe=False` lets a single-stage command reuse a run dir with a changed recipe (the stages
    themselves check what matters, e.g. convert checks the trained quantizers).
    """
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        if force:
            shutil.rmtree(out)
        elif not resume:
            raise RecipeError(
                f"output dir {out} exists and is not empty: pass --resume to continue it or --force to replace it"
            )
        elif not RunLayout(out).manifest_path.exists():
            raise RecipeError(f"--resume: {out} is not a qatkit run dir (no manifest.json)")
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(out)
    previous = run.manifest()
    changes = _changes_since_start(previous, recipe) if resume and same_recipe else []
    if changes:
        raise RecipeError(
            f"--resume: the recipe changed since {out} was started ({'; '.join(changes)}); use --force to start over"
        )
    run.resolved_recipe.write_text(dump_recipe(recipe))
    run.update_manifest(
        qatkit_run=1,
        recipe_name=recipe.name,
        recipe_hash=recipe.digest(),
        recipe=recipe.model_dump(),
        quantization=recipe.quant.to_dict(),
        versions=package_versions(),
        host=host_description(),
        trust_remote_code=recipe.model.trust_remote_code,
        stages=previous.get("stages", {}),
    )
    return run


def _changes_since_start(manifest: dict, recipe: Recipe) -> list[str]:
    """How `recipe` differs from the one a run dir was started with ([]: not at all). The stored recipe is read
    with today's schema, so a qatkit upgrade (a new setting at its default, another hash formula) is no change."""
    if "recipe" not in manifest:
        started = manifest.get("recipe_hash")
        return [] if started in (None, recipe.digest()) else [f"recipe hash: {started!r} → {recipe.digest()!r}"]
    try:
        started = Recipe.model_validate(manifest["recipe"])
    except ValueError:
        return ["it has a setting this qatkit no longer knows"]
    return recipe.changes_from(started)
