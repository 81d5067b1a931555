"""What each CLI command does; each returns its result, which `render` shows. cli.py only parses and maps errors."""

from __future__ import annotations

import json
from pathlib import Path

from qatkit.core.errors import Interrupted, RecipeError
from qatkit.core.log import console
from qatkit.recipe import Recipe, load_recipe, validate_recipe


def _out_dir(recipe: Recipe, out: Path | None) -> Path:
    return out or Path(recipe.out or f"runs/{recipe.name}")


def run_command(
    recipe_path: Path, out: Path | None, overrides: list[str], *, resume: bool, force: bool, only: list[str] | None
) -> Path | None:
    """Run the recipe's stages (or `only` some) and return the run dir."""
    from qatkit.backends.base import backend_name
    from qatkit.pipeline import run_recipe
    from qatkit.validate import preflight

    recipe = load_recipe(recipe_path, overrides)
    # the recipe keeps its stages even when `only` some run: they decide e.g. whether convert converts the
    # fine-tuned model or quantizes the original one (PTQ)
    stages = only or recipe.stages
    if absent := [s for s in stages if s not in recipe.stages]:
        raise RecipeError(f"{recipe_path}: the recipe has no {absent[0]} stage (stages: {', '.join(recipe.stages)})")
    if "finetune" in stages and backend_name(recipe) == "unsloth":
        from qatkit.backends.unsloth import import_unsloth

        import_unsloth()  # before the preflight pulls in transformers (via lm_eval)
    preflight(recipe, stages)

    target = _out_dir(recipe, out)
    console.print(
        f"[bold]qatkit[/] {recipe.name}: scheme [cyan]{recipe.qat.scheme}[/], stages {', '.join(stages)} → {target}"
    )
    try:
        run = run_recipe(
            recipe,
            target,
            resume=resume,
            force=force,
            only=only,
            on_stage=lambda name, status: console.print(f"[bold]▶ {name}[/] {status}"),
        )
    except Interrupted as e:
        raise e.with_resume(["qatkit", "run", str(recipe_path), "--out", str(target)], overrides) from None
    return run.root if run is not None else None  # None: a secondary training process, done after finetune


def launch_command(
    recipe_path: Path, overrides: list[str], argv: list[str], num_processes: int, only: list[str] | None = None
) -> int:
    """Check the recipe once here, then start N training processes (`argv`: this command line)."""
    from qatkit.core import distributed
    from qatkit.validate import preflight

    preflight(load_recipe(recipe_path, overrides), only)
    console.print(f"[bold]qatkit[/] launching {num_processes} training processes (accelerate)")
    return distributed.launch(distributed.strip_num_processes(argv), num_processes)


def convert_command(
    recipe_path: Path | None, out: Path | None, overrides: list[str], from_: Path | None, scheme: str | None
) -> Path | None:
    if (recipe_path is None) == (from_ is None):
        raise RecipeError("give either a RECIPE or --from MODEL_DIR --scheme NAME")
    if recipe_path is not None:
        return run_command(recipe_path, out, overrides, resume=False, force=False, only=["convert"])
    if scheme is None:
        raise RecipeError("--from needs --scheme (see `qatkit schemes`)")
    if not from_.exists():
        raise RecipeError(f"--from {from_}: no such model directory")
    from qatkit.pipeline import run_recipe
    from qatkit.validate import preflight

    recipe = validate_recipe(
        {
            "name": f"{from_.name}-{scheme}",
            "model": {"name_or_path": str(from_.resolve())},
            "qat": {"scheme": scheme},
            "stages": ["convert"],
        },
        source="--from/--scheme",
    )
    preflight(recipe)
    target = out or Path(f"runs/{recipe.name}")
    return run_recipe(recipe, target, force=False, only=["convert"]).root


def eval_command(
    model_dir: Path,
    tasks: list[str],
    limit: int | None,
    num_fewshot: int,
    batch_size: int,
    include_path: Path | None,
    output: Path | None,
    mmlu_from: str | None = None,
) -> dict:
    """lm-eval scores of a model directory: task -> metrics."""
    from qatkit.evaluation.lmeval import check_tasks_available, evaluate_model
    from qatkit.models.loading import load_model_and_tokenizer
    from qatkit.recipe import EvalSpec, ModelSpec

    if not tasks:
        raise RecipeError("--tasks: name at least one lm-eval task (comma-separated)")
    if not (model_dir / "config.json").exists():
        raise RecipeError(f"{model_dir}: not a model directory (no config.json)")
    includes = [str(include_path.resolve())] if include_path else []
    if mmlu_from:  # lm-eval's mmlu tasks, written from a local file (takes precedence over the built-in ones)
        from qatkit.evaluation.mmlu_local import local_mmlu_tasks

        includes.append(str(local_mmlu_tasks(mmlu_from, tasks, num_fewshot)))
    check_tasks_available(tasks, includes)
    spec = EvalSpec(tasks=tasks, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size)
    model, tokenizer = load_model_and_tokenizer(ModelSpec(name_or_path=str(model_dir)), path=str(model_dir))
    results = evaluate_model(model.eval(), tokenizer, tasks, spec, includes)
    if output:
        output.write_text(
            json.dumps(
                {"model": str(model_dir), "tasks": tasks, "limit": limit, "mmlu_from": mmlu_from, "results": results},
                indent=2,
            )
        )
    return results


def export_command(run_dir: Path, fmt: str, max_seq_len: int | None, parity_min_sqnr: float | None) -> dict:
    """Export a run's converted model (`qatkit export`), then rebuild its report."""
    from qatkit.export import export_run
    from qatkit.report.build import build_report
    from qatkit.run.rundir import RunDir

    result = export_run(run_dir, fmt, max_seq_len=max_seq_len, parity_min_sqnr=parity_min_sqnr)
    build_report(RunDir(run_dir.resolve()))
    return result


def generate_command(pte: Path, prompt: str, max_new_tokens: int) -> dict:
    from qatkit.export.executorch import generate

    return generate(pte, prompt, max_new_tokens)


def validate_command(recipe_path: Path, overrides: list[str]):
    """Everything checkable before a model loads, and the module plan (a `validate.Validation`)."""
    from qatkit.validate import validate

    return validate(load_recipe(recipe_path, overrides))


def schemes_command() -> list:
    from qatkit.quant.registry import list_schemes

    return list_schemes()


def report_command(run_dir: Path) -> Path:
    from qatkit.report.build import build_report
    from qatkit.run.rundir import RunDir

    if not (run_dir / "manifest.json").exists():
        raise RecipeError(f"{run_dir}: not a qatkit run dir (no manifest.json)")
    build_report(RunDir(run_dir.resolve()))
    return run_dir


def bench_command(
    model: str | None,
    tiny: bool,
    scheme_names: list[str],
    out: Path | None,
    quick: bool,
    threads: int | None = None,
    lora_modes: list[str] | None = None,
    sections: list[str] | None = None,
    arch: Path | None = None,
) -> tuple[dict, Path]:
    """`qatkit bench perf`: the `run_all` result and the directory of bench.json and bench.md (default:
    benchmarks/<model>). `render.bench_perf` prints it."""
    import tempfile

    from qatkit.bench import TINY_TEXTS, run_all
    from qatkit.bench.common import LORA_MODES, OPTIONAL_SECTIONS, SECTIONS, SEED, build_random_model
    from qatkit.bench.suite import perf_command_line
    from qatkit.models.loading import check_model_available, materialize_gguf, resolve_model
    from qatkit.quant.hardware import require_hardware
    from qatkit.quant.registry import get_scheme

    if sum((model is not None, tiny, arch is not None)) != 1:
        raise RecipeError(
            "give one of --model MODEL (a model dir, .gguf file or pkg:<package>/<file>), --tiny, or --arch CONFIG.json"
        )
    if not scheme_names:
        raise RecipeError("--schemes: give at least one scheme (see `qatkit schemes`)")
    sections = sections or list(SECTIONS)
    lora_modes = lora_modes or list(LORA_MODES)
    for given, known, option in (
        (sections, SECTIONS + OPTIONAL_SECTIONS, "--sections"),
        (lora_modes, LORA_MODES, "--lora-modes"),
    ):
        if unknown := [x for x in given if x not in known]:
            raise RecipeError(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    names = []
    for name in scheme_names:
        scheme = get_scheme(name)
        require_hardware(scheme, "train")
        require_hardware(scheme, "convert")  # checkpoint size and decode speed need a converted model
        names.append(scheme.name)
    if tiny:
        label, model_args = "tiny", ["--tiny"]
    elif arch is not None:
        label, model_args = f"{arch.stem}-random", ["--arch", str(arch)]
    else:
        label, model_args = Path(model.removeprefix("pkg:")).name.removesuffix(".gguf"), ["--model", model]
    target = out or Path("benchmarks") / label.lower()
    command = perf_command_line(model_args, names, target, quick, threads, sections, lora_modes)
    with tempfile.TemporaryDirectory(prefix="qatkit-bench-") as tmp:
        if tiny:
            from qatkit.testing import build_tiny_model

            model_dir = str(build_tiny_model(Path(tmp) / "tiny-llama", TINY_TEXTS))
            description = "tiny llama from qatkit.testing.build_tiny_model (hidden 128, 2 layers, fp32, seed 0)"
        elif arch is not None:
            model_dir = str(Path(tmp) / arch.stem)
            params = build_random_model(arch, Path(model_dir))
            description = f"{arch} with random weights (seed {SEED}, {params / 1e9:.3g} B parameters)"
        else:
            source = resolve_model(model)
            check_model_available(source)
            model_dir = materialize_gguf(source).path
            description = model if model_dir == model else f"{model} (HF copy: {model_dir})"
        console.print(f"[bold]qatkit bench[/] {description}: schemes {', '.join(names)} → {target}")
        result = run_all(
            model_dir,
            target,
            quick,
            schemes=names,
            lora_modes=lora_modes,
            sections=sections,
            model_label=description,
            command=command,
            threads=threads,
            progress=lambda msg: console.print(msg, markup=False),
        )
    return result, target
