"""What `qatkit bench perf` and `qatkit bench recovery` print when they finish (rich), in one place.

The files they write (bench.md, recovery.md) are rendered by suite.render_markdown and recovery.render.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from qatkit.bench.recovery import figures, pct
from qatkit.log import console


def perf_summary(r: dict, out: Path) -> None:
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
    if cs := r.get("cli_startup"):
        table.add_row(
            "qatkit --help start-up", f"{cs['ratio']:.1f}× python -c pass (+{cs['overhead_s'] * 1000:.0f} ms)"
        )

    console.print(table)
    if r["load"]["shared_with_other_jobs"]:
        console.print("[yellow]the machine was shared with other jobs during the run (recorded in bench.md)[/]")
    console.print(f"results: {out / 'bench.json'}, {out / 'bench.md'}")


def recovery_summary(summary: dict, out: Path) -> None:
    """QAT against fine-tune-then-PTQ per run of a `run_recovery` summary, and where recovery.md is."""
    table = Table(
        "run", "QAT acc", "ft-PTQ acc", "nd vs base", "nd vs ft (acc)", "NLL recovery vs ft", title="recovery"
    )
    for name, run in summary["runs"].items():
        f = figures(run)
        v = run["variants"]
        recovery = None if f["nll_nd_vs_ft"] is None else 1 + f["nll_nd_vs_ft"]
        table.add_row(
            name,
            f"{100 * v['qat']['acc']:.1f}",
            f"{100 * v['ft-ptq']['acc']:.1f}",
            pct(f["acc_nd_vs_base"]),
            pct(f["acc_nd_vs_ft"]),
            pct(recovery),
        )
    console.print(table)
    console.print(f"results: {out / 'recovery.md'}")
