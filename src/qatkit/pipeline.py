"""Run directories: atomic stages, DONE markers, resume, and the manifest.

<out>/
  recipe.resolved.yaml   manifest.json   report.md / report.json
  data/{train,eval}.jsonl
  finetune/ convert/ eval/          finished stages (DONE written last)
  .finetune.partial/ ...            a stage in progress (checkpoints live here until it finishes)
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from qatkit import distributed
from qatkit.errors import Interrupted, RecipeError
from qatkit.recipe import Recipe, dump_recipe

PACKAGES = ("qatkit", "torch", "torchao", "transformers", "peft", "trl", "lm_eval", "accelerate", "datasets", "unsloth")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def _deep_merge(base: dict, updates: dict) -> dict:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak RSS of this process, MB: VmHWM, the high-water mark of this process's own memory map.

    Not ru_maxrss: a child started with vfork/posix_spawn (what subprocess does) inherits the *parent's*
    peak RSS into ru_maxrss at exec, so a worker started from a big process would report the parent's peak.
    """
    peak = proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_memory_mb() -> dict[str, float]:
    out = {"cpu_rss_mb": round(peak_rss_mb(), 1)}

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


@dataclass
class RunDir:
    root: Path

    def stage(self, name: str) -> Path:
        return self.root / name

    def partial(self, name: str) -> Path:
        return self.root / f".{name}.partial"

    def is_done(self, name: str) -> bool:
        return (self.stage(name) / "DONE").exists()

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else {}

    def update_manifest(self, **updates) -> dict:
        data = _deep_merge(self.manifest(), updates)
        write_json_atomic(self.manifest_path, data)
        return data

    @contextmanager
    def atomic_stage(self, name: str, resume: bool):
        """Yield a work dir; on success it becomes <root>/<name> with DONE written last.

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
        _fsync_tree(work)
        final = self.stage(name)
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
        (final / "DONE").write_text(f"{time.time()}\n")
        _fsync_dir(final)
        _fsync_dir(self.root)
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
        elif not (out / "manifest.json").exists():
            raise RecipeError(f"--resume: {out} is not a qatkit run dir (no manifest.json)")
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(out)
    previous = run.manifest()
    changes = _changes_since_start(previous, recipe) if resume and same_recipe else []
    if changes:
        raise RecipeError(
            f"--resume: the recipe changed since {out} was started ({'; '.join(changes)}); use --force to start over"
        )
    (out / "recipe.resolved.yaml").write_text(dump_recipe(recipe))
    run.update_manifest(
        qatkit_run=1,
        recipe_name=recipe.name,
        recipe_hash=recipe.digest(),
        recipe=recipe.model_dump(),
        versions=package_versions(),
        host={"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
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


StageFn = Callable[[Recipe, RunDir, Path, bool], dict]


def run_stage(run: RunDir, name: str, fn: StageFn, recipe: Recipe, *, resume: bool) -> dict:
    with run.atomic_stage(name, resume=resume) as work:
        summary = fn(recipe, run, work, resume)
        if distributed.is_main():
            write_json_atomic(work / "stage.json", {"stage": name, "summary": summary, "versions": package_versions()})
    if distributed.is_main():
        run.update_manifest(stages={name: {"summary": summary}})
    return summary


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()} (x{torch.cuda.device_count()})"
    return (
        f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    )


def prepare_data(recipe: Recipe, run: RunDir) -> dict | None:
    """Split the recipe's data once per run dir (train / held-out), recorded with a hash."""
    from qatkit.data import load_splits, write_splits

    if recipe.data is None:
        return None
    data_dir = run.root / "data"
    if (data_dir / "DONE").exists():
        return run.manifest().get("data")
    info = write_splits(load_splits(recipe.data), data_dir, recipe.data.answer_style)
    (data_dir / "DONE").touch()
    run.update_manifest(data={"source": " + ".join(s.path for s in recipe.data.sources), **info})
    return info


def stage_function(name: str) -> StageFn:
    import importlib

    return importlib.import_module(f"qatkit.stages.{name}").run


STAGE_NEEDS = {"convert": ["finetune"], "eval": ["convert"]}  # when the recipe has that stage


def run_recipe(
    recipe: Recipe,
    out: Path,
    *,
    resume: bool = False,
    force: bool = False,
    only: list[str] | None = None,
    on_stage: Callable[[str, str], None] | None = None,
) -> RunDir | None:
    """Run the recipe's stages (or `only` some of them) in `out`, then rebuild the report.

    Under a multi-process launcher every process trains; the others then return None and the main
    process runs the remaining stages alone.
    """
    from qatkit.stages import report

    distributed.init()
    single = only is not None
    stages = only or recipe.stages
    for name in stages:  # before anything is written
        for needed in STAGE_NEEDS.get(name, []):
            done = not force and RunDir(out.resolve()).is_done(needed)
            if needed in recipe.stages and needed not in stages and not done:
                raise RecipeError(
                    f"stage {name} needs a finished {needed} stage in {out.resolve()}; run `qatkit {needed}` first"
                )
    if distributed.is_main():
        reuse = single and (out / "manifest.json").exists()
        run = open_run_dir(out, recipe, resume=resume or reuse, force=force, same_recipe=not reuse)
        prepare_data(recipe, run)
        if "model" not in run.manifest():
            from qatkit.loading import model_fingerprint

            run.update_manifest(model=model_fingerprint(recipe.model.name_or_path), device=device_description())
        if "finetune" in stages:
            run.update_manifest(training_processes=distributed.world_size())

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
    report.build(run)
    return run
