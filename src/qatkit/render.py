"""What the CLI shows: every table and summary the commands' results are printed as (rich), in one place."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from qatkit.core.log import console
from qatkit.evaluation import variants


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def run_summary(root: Path | None) -> None:
    """Stages, training, quality, parity and where the checkpoint is, from a run dir's report.json."""
    rep_path = root / "report.json" if root else None
    if rep_path is None or not rep_path.exists():
        return
    rep = json.loads(rep_path.read_text())
    stages = Table("stage", "status", "seconds", title="stages")
    for name, s in rep["stages"].items():
        stages.add_row(name, s["status"] or "", f"{s['seconds']:.1f}" if s["seconds"] else "")
    console.print(stages)
    if t := rep.get("training"):
        console.print(f"training: {t['steps']} steps, loss {t['first_loss']:.4f} → {t['final_loss']:.4f}")
    if rep.get("quality"):
        q = Table("task", "variant", "accuracy", "± stderr", "norm. degradation", title="quality")
        for r in rep["quality"]:
            nd = r["normalized_degradation"]
            q.add_row(
                f"{r['task']} ({r['metric']})",
                variants.label(r["variant"]),
                _pct(r["value"]),
                _pct(r["stderr"]),
                "—" if nd is None else f"{100 * nd:+.1f}%",
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
    if g := rep.get("gguf"):
        engine = g.get("llama_cpp")
        ran = f"llama.cpp logits SQNR {engine['sqnr_db']:.1f} dB" if engine else g.get("llama_cpp_skipped")
        console.print(f"gguf: [bold]{root / 'export' / g['file']}[/] ({g['bytes'] / 2**20:.2f} MB) — {ran}")
    console.print(f"report: {root / 'report.md'}")


def export_result(result: dict) -> None:
    if result["format"] == "gguf":
        engine = result.get("llama_cpp")
        console.print(
            f"GGUF: [bold]{result['gguf']}[/] ({result['bytes'] / 2**20:.1f} MB, linears {result['weights']}, "
            f"embeddings {result['embeddings']}; packed tensors bit-exact: {not result['packed_not_bit_exact']})"
        )
        console.print(
            f"llama.cpp vs the converted model: SQNR {engine['sqnr_db']:.1f} dB, top-1 agreement "
            f"{100 * engine['top1_agreement']:.1f}% over {engine['tokens']} positions (gate {result['threshold_db']} dB)"
            if engine
            else f"[yellow]{result['llama_cpp_skipped']}[/]"
        )
        return
    p, floor = result["parity"], result["floor"]["bytes"]
    console.print(
        f"ExecuTorch: [bold]{result['pte']}[/] ({result['pte_bytes'] / 2**20:.1f} MB, {result['pte_bytes'] / floor:.2f}× "
        f"the scheme's floor of {floor / 2**20:.1f} MB; KV cache {result['max_seq_len']} tokens)"
    )
    console.print(
        f"runtime parity vs the converted model: SQNR {p['sqnr_db']:.1f} dB, top-1 agreement "
        f"{100 * p['top1_agreement']:.1f}% over {p['tokens']} tokens (gate {result['threshold_db']} dB)"
    )


def generation(result: dict) -> None:
    console.print(result["text"], highlight=False, markup=False)
    console.print(
        f"[dim]{result['prompt_tokens']} prompt tokens in {result['prefill_ms']} ms, {result['new_tokens']} new tokens, "
        f"{result['decode_ms_per_token']} ms/token (ExecuTorch runtime)[/]"
    )


def packed_state(where: Path, manifest: dict) -> None:
    files = manifest["files"]
    size = sum(f["bytes"] for f in files if "same_as" not in f)
    checkpoints = sorted(
        {p.parent.as_posix() for f in files if (p := Path(f["path"])).parent.name.startswith("checkpoint-")}
    )
    console.print(f"{where}: {len(files)} files, {size / 2**20:.1f} MB in {manifest['parts']} parts")
    for checkpoint in checkpoints:
        console.print(f"  trainer checkpoint: {checkpoint}")
    for converted in manifest.get("left_out", []):
        console.print(f"  left out: {converted} (--resume converts the finished fine-tune again)")


def eval_results(model_dir: Path, results: dict) -> None:
    table = Table("task", "metric", "value", "stderr", title=f"lm-eval: {model_dir}")
    for task, metrics in results.items():
        for name, value in metrics.items():
            if not name.endswith("_stderr") and isinstance(value, int | float):  # not per_item lists
                err = metrics.get(f"{name}_stderr")
                table.add_row(task, name, f"{value:.4f}", f"{err:.4f}" if isinstance(err, float) else "—")
    console.print(table)


def validation(recipe_path: Path, v) -> None:
    """A `validate.Validation`: the recipe's resolved quantization, the module plan per type, the size estimate."""
    recipe = v.recipe
    console.print(
        f"[green]✓[/] {recipe_path}: recipe is valid; scheme [cyan]{recipe.qat.scheme}[/], "
        f"backend {recipe.backend}, stages {', '.join(recipe.stages)}; model {v.source.describe()}"
    )
    console.print(f"quantization: {recipe.quant.describe()}")
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


def schemes(entries: list) -> None:
    short = {"cpu": "CPU/GPU", "cuda": "CUDA", "cuda-sm89": "CUDA sm89+", "cuda-sm100": "Blackwell"}
    table = Table("scheme", "what it is", "trains on", "converts on", "learn_scales", title="qatkit schemes")
    for s in entries:
        name = s.name + (f"\n({', '.join(s.aliases)})" if s.aliases else "")
        table.add_row(name, s.summary, short[s.train_on], short[s.convert_on], "yes" if s.learnable_scales else "")
    console.print(table)
    for s in entries:
        extra = "; ".join(x for x in (s.notes, f"on CPU use {s.cpu_alternatives}" if s.cpu_alternatives else "") if x)
        console.print(f"[bold]{s.name}[/]: {s.configs}" + (f" — {extra}" if extra else ""), soft_wrap=True)


def bench_perf(r: dict, out: Path) -> None:
    """The headline ratios of a `run_all` result (every section that ran), and where bench.json and bench.md are."""
    table = Table("figure", "value", title="qatkit bench (ratios measured within this run)")
    if "step_time" in r:
        plain = r["step_time"]["variants"]["plain"]["median_s_per_step"]
        table.add_row("plain LoRA step", f"{plain:.3f} s")
    for name, v in r.get("step_time", {}).get("variants", {}).items():
        if v["scheme"]:
            table.add_row(f"step time {name}", f"{v['ratio_vs_plain']:.2f}× plain")
    for name, p in r.get("step_time", {}).get("parity", {}).items():
        table.add_row(f"fq cache parity {name}", "[green]identical[/]" if p["identical"] else "[bold red]DIFFERENT[/]")
    for name, v in r.get("train_memory", {}).get("variants", {}).items():
        if v["scheme"]:
            table.add_row(f"train memory {name}", f"{v['ratio_vs_plain']:.2f}× plain")
    for sc, c in r.get("checkpoint_size", {}).items():
        table.add_row(
            f"checkpoint {sc}",
            f"{c['weights_bytes'] / 2**20:.1f} MB: {c['ratio_vs_bf16']:.2f}× bf16, {c['ratio_vs_floor']:.2f}× floor",
        )
    for sc, d in r.get("decode_latency", {}).items():
        table.add_row(
            f"decode {sc}",
            f"{d['converted']['tokens_per_s']:.1f} vs {d['original']['tokens_per_s']:.1f} tok/s: "
            f"latency {d['latency_ratio']:.2f}× original, scoring {d['score_ratio']:.2f}×, "
            f"memory {d['memory_ratio']:.2f}×",
        )
    if g := r.get("gguf"):
        table.add_row(
            "llama.cpp Q4_0 decode",
            f"{g['llamacpp_tok_s']['Q4_0']:.0f} tok/s: {g['q4_0_vs_fp32_speed']:.2f}× transformers fp32, "
            f"{g['q4_0_vs_f16_speed']:.2f}× llama.cpp F16; file {g['q4_0_vs_f16_size']:.2f}× F16",
        )
    if (e := r.get("executorch")) and "skipped" not in e:
        table.add_row(
            ".pte (ExecuTorch)",
            f"{e['pte_bytes'] / 2**20:.1f} MB ({e['ratio_vs_floor']:.2f}× floor); {e['ms_per_token']['pte']:.1f} ms/token: "
            f"{e['pte_time_ratio_vs_original']:.2f}× fp32, {e['pte_time_ratio_vs_converted']:.2f}× converted",
        )
    if cs := r.get("cli_startup"):
        table.add_row(
            "qatkit --help start-up", f"{cs['ratio']:.1f}× python -c pass (+{cs['overhead_s'] * 1000:.0f} ms)"
        )

    console.print(table)
    if r["load"]["shared_with_other_jobs"]:
        console.print("[yellow]the machine was shared with other jobs during the run (recorded in bench.md)[/]")
    console.print(f"results: {out / 'bench.json'}, {out / 'bench.md'}")


def bench_recovery(summary: dict, out: Path) -> None:
    """QAT against fine-tune-then-PTQ per run of a `run_recovery` summary, and where recovery.md is."""
    from qatkit.bench.recovery import figures, pct, recovery

    table = Table(
        "run",
        "QAT acc",
        "ft-PTQ acc",
        "nd vs base",
        "nd vs ft (acc)",
        "NLL recovery vs ft",
        "text NLL recovery vs ft",
        title="recovery",
    )
    for name, run in summary["runs"].items():
        f = figures(run)
        v = run["variants"]
        table.add_row(
            name,
            f"{100 * v['qat']['acc']:.1f}",
            f"{100 * v['ft-ptq']['acc']:.1f}",
            pct(f["acc_nd_vs_base"]),
            pct(f["acc_nd_vs_ft"]),
            pct(recovery(f["nll_nd_vs_ft"])),
            pct(recovery(f["text_nll_nd_vs_ft"])),
        )
    console.print(table)
    console.print(f"results: {out / 'recovery.md'}")


def bench_gguf_recovery(result: dict, out: Path) -> None:
    """llama.cpp NLL of F16, plain and QAT GGUFs and the recovery, and where gguf-recovery.md is."""
    table = Table("GGUF", "NLL/token", "perplexity", title=f"llama.cpp, held-out text ({result['text']['docs']} docs)")
    for name in ("F16", "plain", "QAT"):
        table.add_row(name, f"{result['nll'][name]:.4f}", f"{result['perplexity'][name]:.2f}")
    console.print(table)
    recovery = result["recovery"]
    console.print(
        f"QAT wins back {'—' if recovery is None else f'{100 * recovery:.1f}%'} of the plain quantization's NLL rise"
    )
    console.print(f"results: {out / 'gguf-recovery.md'}")
