"""`qatkit bench perf`: every section on one model, written as bench.json and bench.md."""

import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from qatkit.bench.checkpoint import checkpoint_size
from qatkit.bench.common import (
    DEFAULT_SCHEMES,
    FULL,
    LORA_MODES,
    OPTIONAL_SECTIONS,
    QUICK,
    SECTIONS,
    Settings,
    quiet,
)
from qatkit.bench.decode import decode_latency_many
from qatkit.bench.executorch import executorch_decode
from qatkit.bench.gguf import gguf_decode
from qatkit.bench.host import Snapshot, auto_threads, cli_startup, load_between, machine, snapshot
from qatkit.bench.markdown import render_markdown
from qatkit.bench.training import step_time, train_memory

# --- everything --------------------------------------------------------------------------------


def run_all(
    model_dir: str | Path,
    out_dir: str | Path,
    quick: bool,
    *,
    schemes: Sequence[str] = DEFAULT_SCHEMES,
    lora_modes: Sequence[str] = LORA_MODES,
    sections: Sequence[str] = SECTIONS,
    model_label: str | None = None,
    command: str | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run the `sections` on `model_dir` and write `out_dir/bench.json` and `out_dir/bench.md`.

    `threads`: torch threads of the timed sections (step time, decode); None picks `auto_threads()`.
    """
    quiet()
    settings = QUICK if quick else FULL
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = str(model_dir)
    say = progress or (lambda msg: None)
    command = (
        command or f"python -c 'from qatkit.bench import run_all; run_all({model_dir!r}, {str(out_dir)!r}, {quick})'"
    )
    result = _header(model_dir, quick, settings, schemes, lora_modes, sections, model_label or model_dir, command)
    threads, why = auto_threads() if threads is None else (threads, {"policy": "given"})
    result["threads"] = {"timed_sections": threads, **why}
    say(f"torch threads for the timed sections: {threads} ({why['policy']})")
    start = snapshot()
    ckpt_root = Path(tempfile.mkdtemp(prefix="qatkit-bench-"))  # checkpoint_size's checkpoints, reused by decode
    try:
        jobs = _section_jobs(model_dir, settings, schemes, lora_modes, threads, ckpt_root, say)
        for name, job in jobs.items():
            if name in sections:
                _run_section(result, name, job, say)
    finally:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    _close_load(result["load"], start)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "bench.md").write_text(render_markdown(result))
    return result


def _header(
    model_dir: str,
    quick: bool,
    settings: Settings,
    schemes: Sequence[str],
    lora_modes: Sequence[str],
    sections: Sequence[str],
    model_label: str,
    command: str,
) -> dict:
    """bench.json before any section: what runs, on which machine, and the load before it starts."""
    return {
        "qatkit_bench": 1,
        "command": command,
        "model": model_label,
        "model_dir": model_dir,
        "quick": quick,
        "schemes": list(schemes),
        "lora_modes": list(lora_modes),
        "sections": list(sections),
        "settings": asdict(settings),
        "machine": machine(),
        "load": {"before": {"loadavg": [round(x, 2) for x in os.getloadavg()]}, "sections": {}},
    }


def _section_jobs(
    model_dir: str,
    s: Settings,
    schemes: Sequence[str],
    lora_modes: Sequence[str],
    threads: int,
    ckpt_root: Path,
    say: Callable[[str], None],
) -> dict[str, Callable[[], dict]]:
    """Every section as a call, in the order they run (SECTIONS, then OPTIONAL_SECTIONS)."""

    def converted_dirs() -> dict[str, Path]:  # what checkpoint_size left, if it ran
        return {sc: ckpt_root / sc for sc in schemes if (ckpt_root / sc).is_dir()}

    memory_modes, caches = (lora_modes, (False, True)) if s.memory_all_variants else (lora_modes[:1], (True,))
    jobs: dict[str, Callable[[], dict]] = {
        "cli_startup": lambda: cli_startup(s.startup_repeats),
        "step_time": lambda: step_time(
            model_dir, schemes, lora_modes, s, threads=threads, progress=lambda m: say(f"  step_time: {m}")
        ),
        "train_memory": lambda: train_memory(
            model_dir,
            schemes,
            memory_modes,
            s.batch_size,
            s.seq_len,
            s.memory_steps,
            s.lora_r,
            caches=caches,
            progress=lambda m: say(f"  train_memory: {m}"),
        ),
        "checkpoint_size": lambda: {sc: checkpoint_size(model_dir, sc, ckpt_root / sc) for sc in schemes},
        "decode_latency": lambda: decode_latency_many(
            model_dir,
            schemes,
            s.prompt_len,
            s.new_tokens,
            repeats=s.decode_repeats,
            converted_dirs=converted_dirs(),
            threads=threads,
        ),
        "gguf": lambda: gguf_decode(model_dir, s.prompt_len, s.new_tokens, s.decode_repeats, threads),
        "executorch": lambda: executorch_decode(
            model_dir, s.prompt_len, s.new_tokens, repeats=s.decode_repeats, threads=threads
        ),
    }
    assert tuple(jobs) == SECTIONS + OPTIONAL_SECTIONS
    return jobs


def _run_section(result: dict, name: str, job: Callable[[], dict], say: Callable[[str], None]) -> None:
    """Run one section into `result[name]`, with the CPU load of the machine during it."""
    say(f"▶ {name}")
    before = snapshot()
    result[name] = job()
    result["load"]["sections"][name] = load_between(before, snapshot())


def _close_load(load: dict, start: Snapshot) -> None:
    """The load after the run, over the whole run, and whether other jobs shared the machine."""
    end = snapshot()
    load["after"] = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
    load["whole_run"] = load_between(start, end)
    load["shared_with_other_jobs"] = _shared(load)


def perf_command_line(
    model_args: Sequence[str],
    schemes: Sequence[str],
    out: Path,
    quick: bool,
    threads: int | None,
    sections: Sequence[str],
    lora_modes: Sequence[str],
) -> str:
    """The `qatkit bench perf` command line of a run (recorded in bench.json and bench.md); the default sections and
    LoRA modes are left out."""
    extra = [*(["--quick"] if quick else []), *(["--threads", str(threads)] if threads else [])]
    if list(sections) != list(SECTIONS):
        extra += ["--sections", ",".join(sections)]
    if list(lora_modes) != list(LORA_MODES):
        extra += ["--lora-modes", ",".join(lora_modes)]
    return shlex.join(
        ["qatkit", "bench", "perf", *model_args, "--schemes", ",".join(schemes), "--out", str(out), *extra]
    )


def _shared(load: dict) -> bool:
    """Other processes used a noticeable part of the CPU (> 5% overall or > 10% in a section); without
    /proc/stat, a 1-minute load average above half the cores before the run."""
    shares = [sec.get("cpu_share_others") for sec in (load["whole_run"], *load["sections"].values())]
    if shares[0] is None:
        return load["before"]["loadavg"][0] > 0.5 * (os.cpu_count() or 1)
    return shares[0] > 0.05 or any(x is not None and x > 0.10 for x in shares[1:])
