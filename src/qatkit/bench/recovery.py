"""Accuracy-recovery benchmark: does QAT recover what PTQ loses?

One base recipe, run once per (scheme, qat.lora mode) through the ordinary pipeline with every
baseline (bf16, ptq, ft-bf16, ft-ptq). The no-QAT control finetune and the base-model baselines are
shared through qatkit's cache, so each extra run costs one QAT finetune plus its evals. Everything is
measured by qatkit's own eval stage on the same held-out items.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from qatkit.core.errors import Interrupted
from qatkit.core.io import write_json_atomic
from qatkit.core.metrics import normalized_degradation
from qatkit.evaluation import variants as variant_info
from qatkit.pipeline import run_recipe
from qatkit.recipe import load_recipe
from qatkit.run.records import EvalResults, Parity
from qatkit.run.rundir import RunDir


def run_recovery(
    base_recipe: Path, out: Path, schemes: list[str], lora_modes: list[str], overrides: list[str], resume: bool
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for scheme in schemes:
        for mode in lora_modes:
            recipe = load_recipe(
                base_recipe,
                [*overrides, f"qat.scheme={scheme}", f"qat.lora={mode}", "eval.baselines=[bf16,ptq,ft-bf16,ft-ptq]"],
            )
            mode = recipe.training_mode  # "full" for every LoRA mode when the overrides ask for full finetuning
            name = f"{scheme}-{mode}"
            if name in runs:
                continue
            run = run_recipe(recipe, out / name, resume=resume, force=not resume)
            stages = run.manifest()["stages"].values()
            runs[name] = {
                "scheme": scheme,
                "lora_mode": mode,
                "seconds": round(sum(s.get("seconds", 0) for s in stages), 1),  # across resumes too
                **_collect(run),
            }

    summary = {"base_recipe": str(base_recipe), "overrides": overrides, "runs": runs}
    write_json_atomic(out / "recovery.json", summary)
    (out / "recovery.md").write_text(render(summary))
    _plot(summary, out / "recovery.png")
    return summary


def _collect(run_dir: RunDir) -> dict:
    results = EvalResults.load(run_dir.eval.results)
    metric = results.primary_metric.get("heldout", "acc")
    variants = {}
    for name, v in results.variants.items():
        held = v["tasks"]["heldout"]
        variants[name] = {
            "acc": held[metric],
            "stderr": held.get(f"{metric}_stderr"),
            "gold_nll": held.get("gold_nll"),
            "text_nll": v.get("text_nll"),
            "n": held.get("sample_len"),
            "per_item": held.get("per_item", {}).get(metric),
        }
    parity = Parity.load(run_dir.convert.parity)
    data = run_dir.manifest().get("data") or {}
    return {
        "metric": metric,
        "variants": variants,
        "eval_sources": data.get("eval_sources", []),
        "parity_as_trained_sqnr_db": parity.as_trained_vs_converted["sqnr_db"],
    }


def paired_difference_in_stderr(a: list[float] | None, b: list[float] | None) -> float | None:
    """Mean per-item difference a - b over its standard error. Both models scored the same items, so the
    items' shared difficulty cancels: a paired test, tighter than combining the two accuracies' stderrs."""
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    spread = statistics.stdev(diffs)
    return None if spread == 0 else statistics.fmean(diffs) / (spread / math.sqrt(len(diffs)))


def figures(run: dict) -> dict:
    v = run["variants"]
    qat, ft, ftq, base, ptq = (v[k] for k in ("qat", "ft-bf16", "ft-ptq", "bf16", "ptq"))
    se = math.sqrt((qat["stderr"] or 0) ** 2 + (ftq["stderr"] or 0) ** 2)
    return {
        "acc_nd_vs_base": normalized_degradation(qat["acc"], base["acc"], ptq["acc"]),
        "acc_nd_vs_ft": normalized_degradation(qat["acc"], ft["acc"], ftq["acc"]),
        "nll_nd_vs_base": normalized_degradation(
            qat["gold_nll"], base["gold_nll"], ptq["gold_nll"], lower_is_better=True
        ),
        "nll_nd_vs_ft": normalized_degradation(qat["gold_nll"], ft["gold_nll"], ftq["gold_nll"], lower_is_better=True),
        "text_nll_nd_vs_base": _text_nd(qat, base, ptq),
        "text_nll_nd_vs_ft": _text_nd(qat, ft, ftq),
        "qat_minus_ft_ptq_in_stderr": (qat["acc"] - ftq["acc"]) / se if se else None,
        "qat_minus_ft_ptq_paired_in_stderr": paired_difference_in_stderr(qat.get("per_item"), ftq.get("per_item")),
    }


def _text_nd(qat: dict, reference: dict, quantized: dict) -> float | None:
    """Normalized degradation of the held-out general-text NLL (None when the run scored no such text)."""
    return normalized_degradation(*(v.get("text_nll") for v in (qat, reference, quantized)), lower_is_better=True)


def recovery(nd: float | None) -> float | None:
    """Share of the loss PTQ adds that QAT wins back: 1 + normalized degradation (100% = none of it left)."""
    return None if nd is None else 1 + nd


def by_source(run: dict) -> list[dict]:
    """QAT against fine-tune-then-PTQ on each data source's share of the pooled held-out items (a `data.mix`)."""
    qat, ftq = (run["variants"][k].get("per_item") for k in ("qat", "ft-ptq"))
    sources, start = [], 0
    for source in run.get("eval_sources", []):
        end = start + source["eval_rows"]
        a, b = ((items or [])[start:end] for items in (qat, ftq))  # shorter under eval.limit
        sources.append(
            {
                "path": source["path"],
                "n": len(a),
                "qat_acc": statistics.fmean(a) if a else None,
                "ft_ptq_acc": statistics.fmean(b) if b else None,
                "qat_minus_ft_ptq_paired_in_stderr": paired_difference_in_stderr(a, b),
            }
        )
        start = end
    return sources


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}%"


def _acc(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:+.2f}"


def render(summary: dict) -> str:
    lines = [
        "# Accuracy recovery: QAT vs PTQ",
        "",
        f"Base recipe `{summary['base_recipe']}`, overrides {summary['overrides'] or 'none'}. Every variant is scored by "
        "qatkit's eval stage on the same held-out items; the no-QAT control uses the same data, seed, order and steps.",
        "",
    ]
    for run in summary["runs"].values():
        f = figures(run)

        lines += [
            f"## {run['scheme']}, "
            + ("full fine-tuning" if run["lora_mode"] == "full" else f"qat.lora = {run['lora_mode']}"),
            "",
            f"| variant | {run['metric']} | ± stderr | gold NLL/token | held-out text NLL/token |",
            "|---|---|---|---|---|",
        ]
        for key in variant_info.VARIANT_NAMES:
            v = run["variants"][key]
            text = "—" if v["text_nll"] is None else f"{v['text_nll']:.4f}"
            lines.append(
                f"| {key} | {100 * v['acc']:.2f} | {100 * (v['stderr'] or 0):.2f} | {v['gold_nll']:.4f} | {text} |"
            )
        lines += [
            "",
            f"- normalized degradation vs base (cards' definition): accuracy {pct(f['acc_nd_vs_base'])}, "
            f"gold NLL {pct(f['nll_nd_vs_base'])}",
            f"- vs fine-tuned without QAT (what QAT adds): accuracy {pct(f['acc_nd_vs_ft'])}, "
            f"gold NLL {pct(f['nll_nd_vs_ft'])} (recovery {pct(recovery(f['nll_nd_vs_ft']))})",
            f"- held-out general text (never trained on): NLL normalized degradation vs base {pct(f['text_nll_nd_vs_base'])}, "
            f"vs fine-tuned {pct(f['text_nll_nd_vs_ft'])} (recovery {pct(recovery(f['text_nll_nd_vs_ft']))})",
            f"- QAT minus fine-tuned-then-PTQ accuracy: {f['qat_minus_ft_ptq_in_stderr']:.2f} standard errors "
            f"({run['variants']['qat']['n']} items; paired over the same items: {_num(f['qat_minus_ft_ptq_paired_in_stderr'])})",
            *(
                f"- `{s['path']}` ({s['n']} items): QAT {_acc(s['qat_acc'])}, fine-tuned-then-PTQ "
                f"{_acc(s['ft_ptq_acc'])}, paired difference {_num(s['qat_minus_ft_ptq_paired_in_stderr'])} standard errors"
                for s in (by_source(run) if len(run.get("eval_sources", [])) > 1 else [])
            ),
            f"- train/deploy parity, converted vs as-trained: {run['parity_as_trained_sqnr_db']:.1f} dB; run took {run['seconds']:.0f} s",
            "",
        ]
    lines += ["![recovery](recovery.png)", ""]
    return "\n".join(lines)


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    panels = [("acc", "accuracy (%)"), ("gold_nll", "gold NLL / token (lower is better)")]
    if all(v.get("text_nll") is not None for r in runs.values() for v in r["variants"].values()):
        panels.append(("text_nll", "held-out text NLL / token"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), dpi=110)
    for ax, (key, label) in zip(axes, panels, strict=True):
        width = 0.8 / len(variant_info.VARIANT_NAMES)
        for i, variant in enumerate(variant_info.VARIANT_NAMES):
            xs = [j + i * width for j in range(len(runs))]
            scale = 100 if key == "acc" else 1
            ys = [scale * r["variants"][variant][key] for r in runs.values()]
            err = [100 * (r["variants"][variant]["stderr"] or 0) for r in runs.values()] if key == "acc" else None
            ax.bar(xs, ys, width, yerr=err, label=variant, color=variant_info.colour(variant), capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(runs))], list(runs), fontsize=8)
        ax.set_ylabel(label)
        values = [
            (100 if key == "acc" else 1) * r["variants"][v][key]
            for r in runs.values()
            for v in variant_info.VARIANT_NAMES
        ]
        ax.set_ylim(min(values) * 0.95, max(values) * 1.03)
    axes[0].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def recovery_command(
    recipe: Path, out: Path | None, schemes: list[str], lora_modes: list[str], overrides: list[str], resume: bool
) -> tuple[dict, Path]:
    """`qatkit bench recovery`: check the base recipe, run every (scheme, LoRA mode); the summary and where it is
    (default: benchmarks/recovery-<recipe name>). `render.bench_recovery` prints it."""
    from qatkit.validate import preflight

    target = out or Path("benchmarks") / f"recovery-{recipe.stem}"
    preflight(load_recipe(recipe, overrides))
    try:
        return run_recovery(recipe, target, schemes, lora_modes, overrides, resume), target
    except Interrupted as e:
        command = ["qatkit", "bench", "recovery", "--recipe", str(recipe), "--out", str(target)]
        command += ["--schemes", ",".join(schemes), "--lora-modes", ",".join(lora_modes)]
        raise e.with_resume(command, overrides) from None
