"""report: the seed cards' quality table, training summary, parity, sizes, plots and a model card.

Reads only files in the run dir, so `qatkit report RUN_DIR` rebuilds everything without re-running.
"""

from __future__ import annotations

import json
from pathlib import Path

from qatkit.errors import RecipeError
from qatkit.metrics import normalized_degradation
from qatkit.pipeline import RunDir, write_json_atomic

VARIANT_ORDER = ("bf16", "ptq", "ft-bf16", "ft-ptq", "qat")
VARIANT_LABEL = {
    "bf16": "base, original precision",
    "ptq": "base, PTQ (same scheme, no training)",
    "ft-bf16": "fine-tuned without QAT",
    "ft-ptq": "fine-tuned without QAT, then PTQ",
    "qat": "fine-tuned with QAT, converted",
}


def _read(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.exists() else None


def _primary_metric(metrics: dict) -> str | None:
    return next((m for m in ("acc", "acc_norm", "exact_match") if metrics.get(m) is not None), None)


def quality_rows(results: dict) -> list[dict]:
    """One row per (task, variant) with accuracy, stderr and normalized degradation vs bf16/PTQ."""
    variants = results.get("variants", {})
    rows = []
    for task in results.get("tasks", []):
        by_variant = {v: variants[v]["tasks"].get(task, {}) for v in variants}
        ref = by_variant.get("bf16", {})
        metric = (
            results.get("primary_metric", {}).get(task)
            or _primary_metric(ref)
            or next((_primary_metric(m) for m in by_variant.values() if _primary_metric(m)), None)
        )
        base, ptq = ref.get(metric), by_variant.get("ptq", {}).get(metric)
        ft, ft_ptq = by_variant.get("ft-bf16", {}).get(metric), by_variant.get("ft-ptq", {}).get(metric)
        for name in sorted(by_variant, key=lambda v: VARIANT_ORDER.index(v) if v in VARIANT_ORDER else 99):
            m = by_variant[name]
            acc = m.get(metric)
            nd = normalized_degradation(acc, base, ptq) if None not in (acc, base, ptq) else None
            nd_ft = normalized_degradation(acc, ft, ft_ptq) if None not in (acc, ft, ft_ptq) else None
            noise = _combined_stderr(ref.get(f"{metric}_stderr"), by_variant.get("ptq", {}).get(f"{metric}_stderr"))
            rows.append(
                {
                    "task": task,
                    "variant": name,
                    "metric": metric,
                    "value": acc,
                    "stderr": m.get(f"{metric}_stderr"),
                    "gold_nll": m.get("gold_nll"),
                    "nll_normalized_degradation": _nll_nd(m, ref, by_variant.get("ptq")),
                    "nll_normalized_degradation_vs_ft": _nll_nd(m, by_variant.get("ft-bf16"), by_variant.get("ft-ptq")),
                    "normalized_degradation": nd,
                    "normalized_degradation_vs_ft": nd_ft,
                    "ptq_gap_within_noise": nd is not None and noise is not None and abs(base - ptq) < noise,
                    "dtype": variants[name].get("dtype"),
                }
            )
    return rows


def _nll_nd(m: dict, ref: dict | None, ptq: dict | None) -> float | None:
    """Normalized degradation of gold NLL (lower is better): 0 = reference quality, -1 = as bad as its PTQ."""
    values = [d.get("gold_nll") if d else None for d in (m, ref, ptq)]
    return None if None in values else normalized_degradation(*(-v for v in values))


def _combined_stderr(a: float | None, b: float | None) -> float | None:
    return None if not isinstance(a, float) or not isinstance(b, float) else (a * a + b * b) ** 0.5


def _fmt_pct(x: float | None) -> str:

    return "—" if x is None else f"{100 * x:.2f}"


def _fmt_nd(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}%"


def quality_table(rows: list[dict]) -> str:
    with_ft = any(r["variant"] == "ft-ptq" for r in rows)  # the control baselines ran (the cell is "—" on a tie)
    with_nll = any(r.get("gold_nll") is not None for r in rows)
    head = "| task | variant | accuracy (%) | ± stderr | normalized degradation |"
    rule = "|---|---|---|---|---|"
    if with_nll:
        head, rule = head + " gold NLL/token |", rule + "---|"
    if with_ft:
        head, rule = head + " vs fine-tuned without QAT |", rule + "---|"
    lines = [head, rule]
    for r in rows:
        label = VARIANT_LABEL.get(r["variant"], r["variant"]) + (
            f" ({r['dtype']})" if r["variant"] == "bf16" and r["dtype"] else ""
        )
        nd = _fmt_nd(r["normalized_degradation"]) + ("*" if r.get("ptq_gap_within_noise") else "")
        cells = [f"{r['task']} ({r['metric']})", label, _fmt_pct(r["value"]), _fmt_pct(r["stderr"]), nd]
        if with_nll:
            cells.append("—" if r.get("gold_nll") is None else f"{r['gold_nll']:.3f}")
        if with_ft:
            cells.append(_fmt_nd(r.get("normalized_degradation_vs_ft")))

        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("ptq_gap_within_noise") for r in rows):
        lines.append("\n\\* the bf16 - PTQ gap is within one standard error: its normalized degradation is noise.")
    return "\n".join(lines)


def _qat_loss_label(distill: dict | None) -> str:
    if not distill:
        return "with QAT"
    w = distill["weight"]
    return "with QAT: KL to the teacher" if w == 1 else f"with QAT: {1 - w:g}·CE + {w:g}·KL to the teacher"


def _plot_loss(losses: list[dict], control: list[dict], path: Path, qat_label: str) -> bool:
    if not losses:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot([p["step"] for p in losses], [p["loss"] for p in losses], lw=1.4, color="#3366aa", label=qat_label)
    if control:
        ax.plot(
            [p["step"] for p in control], [p["loss"] for p in control], lw=1.2, color="#999999", label="without QAT"
        )
    ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_title("QAT fine-tuning loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _plot_accuracy(rows: list[dict], path: Path) -> bool:
    rows = [r for r in rows if r["value"] is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(5, 3.5 * len(tasks)), 3.4), dpi=110, squeeze=False)
    colors = {"bf16": "#777777", "ptq": "#cc6644", "ft-bf16": "#999999", "ft-ptq": "#dd9977", "qat": "#3366aa"}
    for ax, task in zip(axes[0], tasks, strict=False):
        sub = [r for r in rows if r["task"] == task]
        xs = range(len(sub))
        ax.bar(
            xs,
            [100 * r["value"] for r in sub],
            yerr=[100 * (r["stderr"] or 0) for r in sub],
            color=[colors.get(r["variant"], "#5599cc") for r in sub],
            capsize=3,
        )
        ax.set_xticks(list(xs), [r["variant"] for r in sub])
        lo = min(100 * r["value"] for r in sub)
        ax.set_ylim(max(0, lo - 10), min(100, max(100 * r["value"] for r in sub) + 8))
        ax.set_title(f"{task} ({sub[0]['metric']})")
        ax.set_ylabel("accuracy (%)")
        for x, r in zip(xs, sub, strict=False):
            ax.text(x, 100 * r["value"] + 0.5, f"{100 * r['value']:.1f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def data_sources(data: dict | None) -> list[dict]:
    """A resolved recipe's data sources: `data` itself and its `mix` entries."""
    return [data, *data.get("mix", ())] if data else []


def _data_licenses(data: dict | None) -> str | None:
    """The licenses of the recipe's data sources, each once."""
    return ", ".join(dict.fromkeys(s["license"] for s in data_sources(data) if s.get("license"))) or None


def _size_mb(path: Path) -> float | None:
    files = list(path.glob("*.safetensors")) if path.exists() else []
    return round(sum(f.stat().st_size for f in files) / 2**20, 2) if files else None


def build(run_dir: RunDir) -> dict:
    """Write report.md, report.json, plots and convert/README.md from what the run dir holds."""
    manifest = run_dir.manifest()
    if not manifest:
        raise RecipeError(f"{run_dir.root} is not a qatkit run dir (no manifest.json)")
    recipe = manifest["recipe"]
    results = _read(run_dir.stage("eval") / "results.json") or {}
    losses = _read(run_dir.stage("finetune") / "loss.json") or []
    train = _read(run_dir.stage("finetune") / "train_summary.json")
    parity = _read(run_dir.stage("convert") / "parity.json")
    plan = _read(run_dir.stage("convert") / "qat_plan.json")
    rows = quality_rows(results) if results else []
    plots = {}
    control = _read(run_dir.stage("finetune") / "control" / "loss.json") or []
    if _plot_loss(losses, control, run_dir.root / "loss.png", _qat_loss_label(recipe.get("distill"))):
        plots["loss"] = "loss.png"
    if _plot_accuracy(rows, run_dir.root / "accuracy.png"):
        plots["accuracy"] = "accuracy.png"
    report = {
        "name": recipe["name"],
        "model": recipe["model"]["name_or_path"],
        "scheme": recipe["qat"]["scheme"],
        "qat_lora_mode": "full" if recipe["train"].get("full_finetuning") else recipe["qat"]["lora"],
        "quality": rows,
        "text_nll": {v: d["text_nll"] for v, d in results.get("variants", {}).items() if "text_nll" in d},
        "training": train,
        "parity": parity,
        "checkpoint_mb": _size_mb(run_dir.stage("convert")),
        "original_bf16_mb": manifest.get("stages", {}).get("convert", {}).get("summary", {}).get("original_bf16_mb"),
        "data": manifest.get("data") and {**manifest["data"], "license": _data_licenses(recipe.get("data"))},
        "quantized_modules": len(plan["quantized"]) if plan else None,
        "skipped_modules": plan["skipped"] if plan else None,
        "stages": {
            k: {"status": v.get("status"), "seconds": v.get("seconds")} for k, v in manifest.get("stages", {}).items()
        },
        "plots": plots,
        "versions": manifest.get("versions"),
        "trust_remote_code": manifest.get("trust_remote_code", False),
    }
    write_json_atomic(run_dir.root / "report.json", report)
    (run_dir.root / "report.md").write_text(render_markdown(report, results))
    if run_dir.is_done("convert"):
        from qatkit.stages.model_card import render_model_card

        (run_dir.stage("convert") / "README.md").write_text(render_model_card(report, recipe))
    return report


def _parity_lines(parity: dict | None) -> list[str]:
    if not parity:
        return ["(no convert stage)"]
    out = ["| comparison (logits on a fixed batch) | SQNR (dB) | max abs diff |", "|---|---|---|"]
    labels = {
        "as_trained_vs_converted": "converted vs model as trained (gated)",
        "fake_quant_merged_vs_converted": "converted vs fake-quant of merged model",
        "reloaded_vs_in_memory": "reloaded from disk vs in memory",
    }
    for key, label in labels.items():
        v = parity.get(key)
        if v:
            out.append(f"| {label} | {v['sqnr_db']:.1f} | {v['max_abs_diff']:.3g} |")
    out.append(
        f"\nQAT training mode (LoRA mode, or full): `{parity.get('qat_lora_mode')}`; "
        f"gate threshold {parity.get('threshold_db')} dB."
    )
    return out


def render_markdown(report: dict, results: dict) -> str:
    size = f"converted checkpoint {report['checkpoint_mb']} MB"
    if report.get("original_bf16_mb"):
        size += (
            f" vs {report['original_bf16_mb']} MB in bf16 ({report['checkpoint_mb'] / report['original_bf16_mb']:.0%})"
        )
    lines = [
        f"# qatkit report: {report['name']}",
        "",
        f"Model `{report['model']}`, scheme `{report['scheme']}`, "
        f"{report['quantized_modules'] or 0} modules quantized; {size}.",
        "",
    ]
    if report.get("data"):
        d = report["data"]
        license_note = f" ({d['license']})" if d.get("license") else ""
        lines += [
            f"Data: `{d['source']}`{license_note}: {d['train_rows']} training "
            f"rows, {d['eval_rows']} held-out rows never trained on (split hash {d['sha256_16']}).",
            "",
        ]

    if report["trust_remote_code"]:
        lines += ["**trust_remote_code was enabled for this run.**", ""]
    lines += ["## Quality", ""]
    if report["quality"]:
        lines += [
            quality_table(report["quality"]),
            "",
            "Normalized degradation = (acc - acc_bf16) / (acc_bf16 - acc_ptq): 0% is original quality, "
            "-100% is as bad as plain PTQ (the seed cards' definition).",
            f"Evaluated with lm-eval, {results.get('num_fewshot', 0)}-shot, limit {results.get('limit')}.",
            "",
        ]
        if "accuracy" in report["plots"]:
            lines += ["![accuracy](accuracy.png)", ""]
    else:
        lines += ["(no eval results)", ""]
    if report.get("text_nll"):
        lines += ["| variant | held-out text NLL/token |", "|---|---|"]
        lines += [f"| {VARIANT_LABEL.get(v, v)} | {x:.4f} |" for v, x in report["text_nll"].items()]
        lines += [""]
    lines += ["## Training", ""]

    t = report["training"]
    if t:
        lines += [
            f"{t['steps']} steps on the {t['backend']} backend in {t['seconds']:.0f} s; "
            f"loss {t['first_loss']:.3f} → {t['final_loss']:.3f}; {t['fake_quantized_modules']} fake-quantized modules, "
            f"{t['lora_layers']} LoRA layers.",
            "",
        ]
        if "loss" in report["plots"]:
            lines += ["![loss](loss.png)", ""]
    else:
        lines += ["(no finetune stage: post-training quantization)", ""]
    lines += ["## Train/deploy parity", "", *_parity_lines(report["parity"]), ""]
    if report["skipped_modules"]:
        lines += [
            "## Modules kept in high precision",
            "",
            *[f"- `{k}`: {v}" for k, v in report["skipped_modules"].items()],
            "",
        ]
    lines += [
        "## Stages",
        "",
        "| stage | status | seconds |",
        "|---|---|---|",
        *[f"| {k} | {v['status']} | {v['seconds']} |" for k, v in report["stages"].items()],
        "",
    ]
    versions = ", ".join(f"{k} {v}" for k, v in (report["versions"] or {}).items() if v)
    lines += [f"Versions: {versions}", ""]
    return "\n".join(lines)
