"""The quality rows (accuracy, stderr, normalized degradation per task and variant) and the report's markdown."""

from __future__ import annotations

from qatkit.core.metrics import normalized_degradation
from qatkit.evaluation import variants as variant_info


def _primary_metric(metrics: dict) -> str | None:
    return next((m for m in ("acc", "acc_norm", "exact_match") if metrics.get(m) is not None), None)


def text_nll_table(text_nll: dict[str, float]) -> str:
    """Held-out general text (never trained on): NLL per token per variant, with the normalized degradation vs the
    base model's PTQ loss and vs the fine-tuned model's (what QAT wins back is 100% + the latter)."""

    def nd(variant: str, reference: str, quantized: str) -> str:
        x = normalized_degradation(*(text_nll.get(k) for k in (variant, reference, quantized)), lower_is_better=True)
        return "" if x is None else f"{100 * x:+.1f}%"

    lines = [
        "| variant | held-out text NLL/token | norm. degradation vs base | vs fine-tuned |",
        "|---|---|---|---|",
    ]
    for v in sorted(text_nll, key=variant_info.order):
        lines.append(
            f"| {variant_info.label(v)} | {text_nll[v]:.4f} | {'' if v in ('bf16', 'ptq') else nd(v, 'bf16', 'ptq')} "
            f"| {nd(v, 'ft-bf16', 'ft-ptq') if v == 'qat' else ''} |"
        )
    return "\n".join(lines)


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
        for name in sorted(by_variant, key=variant_info.order):
            m = by_variant[name]
            acc = m.get(metric)
            nd = normalized_degradation(acc, base, ptq)
            nd_ft = normalized_degradation(acc, ft, ft_ptq)
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
    return None if None in values else normalized_degradation(*values, lower_is_better=True)


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
        label = variant_info.label(r["variant"]) + (f" ({r['dtype']})" if r["variant"] == "bf16" and r["dtype"] else "")
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


def qat_loss_label(distill: dict | None) -> str:
    if not distill:
        return "with QAT"
    w = distill["weight"]
    label = "with QAT: KL to the teacher" if w == 1 else f"with QAT: {1 - w:g}·CE + {w:g}·KL to the teacher"
    general = distill.get("general")
    return f"{label} + {general['weight']:g}·KL on general text" if general else label


def data_sources(data: dict | None) -> list[dict]:
    """A resolved recipe's data sources: `data` itself and its `mix` entries."""
    return [data, *data.get("mix", ())] if data else []


def data_licenses(data: dict | None) -> str | None:
    """The licenses of the recipe's data sources, each once."""
    return ", ".join(dict.fromkeys(s["license"] for s in data_sources(data) if s.get("license"))) or None


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


def gguf_lines(gguf: dict) -> list[str]:
    """The GGUF export: what it holds, and llama.cpp's logits against the converted model's."""
    types = ", ".join(f"{n} {t}" for t, n in gguf["tensor_types"].items())
    out = [
        f"`export/{gguf['file']}` ({gguf['bytes'] / 2**20:.2f} MB, {gguf['architecture']}): linears "
        f"{gguf['weights']} packed from the trained integers, embeddings {gguf['embeddings']}; tensors: {types}. "
        f"Packed tensors read back bit for bit: {'yes' if not gguf['packed_not_bit_exact'] else 'NO'}.",
        "",
    ]
    engine = gguf.get("llama_cpp")
    if not engine:
        return [*out, f"Not run in llama.cpp: {gguf.get('llama_cpp_skipped')}"]
    return [
        *out,
        "| llama.cpp vs converted model (logits, fixed batch) | value |",
        "|---|---|",
        f"| SQNR (dB; gate {gguf['threshold_db']}) | {engine['sqnr_db']:.1f} |",
        f"| max abs diff | {engine['max_abs_diff']:.3g} |",
        f"| top-1 agreement over {engine['tokens']} positions | {engine['top1_agreement']:.1%} |",
        f"| greedy tokens identical to transformers' | {engine['greedy_same_as_transformers']} of "
        f"{len(engine['greedy_tokens'])} |",
        "",
        f"Engine: {engine['engine']}, one thread, flash attention off. llama.cpp quantizes activations to 8 bits in "
        "its Q4_0/Q8_0 matmuls, hence not bit-identical logits.",
    ]


def executorch_summary(record: dict) -> str:
    """One paragraph on export/model.pte: its size against the scheme's floor and its parity in the runtime."""
    p, floor = record["parity"], record["floor"]["bytes"]
    return (
        f"`export/model.pte` (ExecuTorch, XNNPACK; KV cache of {record['max_seq_len']} tokens): "
        f"{record['pte_bytes'] / 2**20:.1f} MB, {record['pte_bytes'] / floor:.2f}x the scheme's floor of "
        f"{floor / 2**20:.1f} MB. Its logits in the ExecuTorch runtime vs the converted model's: SQNR "
        f"{p['sqnr_db']:.1f} dB, top-1 agreement {100 * p['top1_agreement']:.1f}% over {p['tokens']} tokens "
        f"(prompt prefill, then KV-cache decode; gate {record['threshold_db']} dB). Run it: "
        f'`qatkit generate export/model.pte --prompt "..."`.'
    )


def render_markdown(report: dict, results: dict) -> str:
    size = f"converted checkpoint {report['checkpoint_mb']} MB"
    if report.get("original_bf16_mb"):
        size += (
            f" vs {report['original_bf16_mb']} MB in bf16 ({report['checkpoint_mb'] / report['original_bf16_mb']:.0%})"
        )
    lines = [
        f"# qatkit report: {report['name']}",
        "",
        f"Model `{report['model']}`, quantization `{report.get('quantization', report['scheme'])}`, "
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
        lines += [text_nll_table(report["text_nll"]), ""]
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
    if report.get("gguf"):
        lines += ["## llama.cpp (GGUF export)", "", *gguf_lines(report["gguf"]), ""]
    if report.get("executorch"):
        lines += ["## ExecuTorch export", "", executorch_summary(report["executorch"]), ""]
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
