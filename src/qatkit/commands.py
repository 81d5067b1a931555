"""What each CLI command does, with its rich output. cli.py only parses and maps errors."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from qatkit.errors import Interrupted, RecipeError
from qatkit.log import console
from qatkit.recipe import Recipe, load_recipe, validate_recipe


def _out_dir(recipe: Recipe, out: Path | None) -> Path:
    return out or Path(recipe.out or f"runs/{recipe.name}")


def run_command(
    recipe_path: Path, out: Path | None, overrides: list[str], *, resume: bool, force: bool, only: list[str] | None
) -> None:
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
    resume_cmd = " ".join(
        ["qatkit run", str(recipe_path), "--out", str(target), "--resume", *(f"--set {o}" for o in overrides)]
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
        raise Interrupted(f"{e}. Resume with: {resume_cmd}") from None
    if run is not None:  # None: a secondary training process, done after the finetune stage
        print_summary(run.root)


def launch_command(
    recipe_path: Path, overrides: list[str], argv: list[str], num_processes: int, only: list[str] | None = None
) -> int:
    """Check the recipe once here, then start N training processes (`argv`: this command line)."""
    from qatkit import distributed
    from qatkit.validate import preflight

    preflight(load_recipe(recipe_path, overrides), only)
    console.print(f"[bold]qatkit[/] launching {num_processes} training processes (accelerate)")
    return distributed.launch(distributed.strip_num_processes(argv), num_processes)


def convert_command(
    recipe_path: Path | None, out: Path | None, overrides: list[str], from_: Path | None, scheme: str | None
) -> None:
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
    run = run_recipe(recipe, target, force=False, only=["convert"])
    print_summary(run.root)


def eval_command(
    model_dir: Path,
    tasks: list[str],
    limit: int | None,
    num_fewshot: int,
    batch_size: int,
    include_path: Path | None,
    output: Path | None,
    mmlu_from: str | None = None,
) -> None:
    from qatkit.loading import load_model_and_tokenizer
    from qatkit.recipe import EvalSpec, ModelSpec
    from qatkit.stages.eval import evaluate_model, preflight

    if not tasks:
        raise RecipeError("--tasks: name at least one lm-eval task (comma-separated)")
    if not (model_dir / "config.json").exists():
        raise RecipeError(f"{model_dir}: not a model directory (no config.json)")
    includes = [str(include_path.resolve())] if include_path else []
    if mmlu_from:  # lm-eval's mmlu tasks, written from a local file (takes precedence over the built-in ones)
        from qatkit.stages.mmlu_local import local_mmlu_tasks

        includes.append(str(local_mmlu_tasks(mmlu_from, tasks, num_fewshot)))
    preflight(tasks, includes)
    spec = EvalSpec(tasks=tasks, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size)
    model, tokenizer = load_model_and_tokenizer(ModelSpec(name_or_path=str(model_dir)), path=str(model_dir))
    results = evaluate_model(model.eval(), tokenizer, tasks, spec, includes)
    table = Table("task", "metric", "value", "stderr", title=f"lm-eval: {model_dir}")
    for task, metrics in results.items():
        for name, value in metrics.items():
            if not name.endswith("_stderr") and isinstance(value, int | float):  # not per_item lists
                err = metrics.get(f"{name}_stderr")
                table.add_row(task, name, f"{value:.4f}", f"{err:.4f}" if isinstance(err, float) else "—")
    console.print(table)
    if output:
        output.write_text(
            json.dumps(
                {"model": str(model_dir), "tasks": tasks, "limit": limit, "mmlu_from": mmlu_from, "results": results},
                indent=2,
            )
        )


def validate_command(recipe_path: Path, overrides: list[str]) -> None:
    from qatkit.validate import validate

    recipe = load_recipe(recipe_path, overrides)
    v = validate(recipe)
    console.print(
        f"[green]✓[/] {recipe_path}: recipe is valid; scheme [cyan]{recipe.qat.scheme}[/], "
        f"backend {recipe.backend}, stages {', '.join(recipe.stages)}; model {v.source.describe()}"
    )
    table = Table("module type", "count", "action", title="QAT plan (per module type)")
    for key, counter in sorted(v.by_type.items()):
        for action, count in counter.items():
            table.add_row(
                key, str(count), "[green]fake-quantize[/]" if action == "quantize" else f"[yellow]skip[/]: {action}"
            )
    console.print(table)
    if v.plan.untie_embeddings:
        console.print("lm_head is tied to the input embedding: it will be untied so each can be quantized on its own.")

    console.print(
        f"Estimated checkpoint size: {v.size_quantized_mb} MB converted vs {v.size_bf16_mb} MB in bf16 "
        f"({v.size_quantized_mb / v.size_bf16_mb:.0%})."
    )


def schemes_command() -> None:
    from qatkit.schemes import list_schemes

    short = {"cpu": "CPU/GPU", "cuda": "CUDA", "cuda-sm89": "CUDA sm89+", "cuda-sm100": "Blackwell"}
    table = Table("scheme", "what it is", "trains on", "converts on", "learn_scales", title="qatkit schemes")
    for s in list_schemes():
        name = s.name + (f"\n({', '.join(s.aliases)})" if s.aliases else "")
        table.add_row(name, s.summary, short[s.train_on], short[s.convert_on], "yes" if s.learnable_scales else "")

    console.print(table)
    for s in list_schemes():
        extra = "; ".join(x for x in (s.notes, f"on CPU use {s.cpu_alternatives}" if s.cpu_alternatives else "") if x)
        console.print(f"[bold]{s.name}[/]: {s.configs}" + (f" — {extra}" if extra else ""), soft_wrap=True)


def report_command(run_dir: Path) -> None:
    from qatkit.pipeline import RunDir
    from qatkit.stages import report

    if not (run_dir / "manifest.json").exists():
        raise RecipeError(f"{run_dir}: not a qatkit run dir (no manifest.json)")
    report.build(RunDir(run_dir.resolve()))
    print_summary(run_dir)


def print_summary(root: Path) -> None:
    rep_path = root / "report.json"
    if not rep_path.exists():
        return
    rep = json.loads(rep_path.read_text())
    stages = Table("stage", "status", "seconds", title="stages")
    for name, s in rep["stages"].items():
        stages.add_row(name, s["status"] or "", f"{s['seconds']:.1f}" if s["seconds"] else "")
    console.print(stages)
    if rep.get("training"):
        t = rep["training"]
        console.print(f"training: {t['steps']} steps, loss {t['first_loss']:.4f} → {t['final_loss']:.4f}")
    if rep.get("quality"):
        from qatkit.stages.report import VARIANT_LABEL

        q = Table("task", "variant", "accuracy", "± stderr", "norm. degradation", title="quality")
        for r in rep["quality"]:
            q.add_row(
                f"{r['task']} ({r['metric']})",
                VARIANT_LABEL.get(r["variant"], r["variant"]),
                "—" if r["value"] is None else f"{100 * r['value']:.2f}",
                "—" if r["stderr"] is None else f"{100 * r['stderr']:.2f}",
                "—" if r["normalized_degradation"] is None else f"{100 * r['normalized_degradation']:+.1f}%",
            )
        console.print(q)
    if rep.get("parity") and rep["parity"].get("as_trained_vs_converted"):
        console.print(
            f"parity: converted vs as-trained SQNR {rep['parity']['as_trained_vs_converted']['sqnr_db']:.1f} dB"
        )
    if (root / "convert" / "DONE").exists():
        console.print(
            f"checkpoint: [bold]{root / 'convert'}[/] ({rep['checkpoint_mb']} MB) — loads with "
            "AutoModelForCausalLM.from_pretrained"
        )
    console.print(f"report: {root / 'report.md'}")


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
    benchmarks/<model>). `bench.render.perf_summary` prints it."""
    import tempfile

    from qatkit import schemes
    from qatkit.bench import TINY_TEXTS, run_all
    from qatkit.bench.common import LORA_MODES, SECTIONS, SEED, build_random_model
    from qatkit.bench.suite import perf_command_line
    from qatkit.loading import check_model_available, materialize_gguf, resolve_model

    if sum((model is not None, tiny, arch is not None)) != 1:
        raise RecipeError(
            "give one of --model MODEL (a model dir, .gguf file or pkg:<package>/<file>), --tiny, or --arch CONFIG.json"
        )
    if not scheme_names:
        raise RecipeError("--schemes: give at least one scheme (see `qatkit schemes`)")
    sections = sections or list(SECTIONS)
    lora_modes = lora_modes or list(LORA_MODES)
    for given, known, option in ((sections, SECTIONS, "--sections"), (lora_modes, LORA_MODES, "--lora-modes")):
        if unknown := [x for x in given if x not in known]:
            raise RecipeError(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    names = []
    for name in scheme_names:
        scheme = schemes.get_scheme(name)
        schemes.require_hardware(scheme, "train")
        schemes.require_hardware(scheme, "convert")  # checkpoint size and decode speed need a converted model
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
