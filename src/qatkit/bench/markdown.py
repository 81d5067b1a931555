"""bench.md: every section of a `qatkit bench perf` result as markdown tables, with what each figure means."""


def _size(b: float) -> str:
    if b >= 2**30:
        return f"{b / 2**30:.2f} GB"
    if b >= 2**20:
        return f"{b / 2**20:.1f} MB"
    return f"{b / 2**10:.0f} KB"


def _x(r: float) -> str:
    return f"{r:.2f}×"


def _md_step_time(st: dict) -> list[str]:
    lines: list[str] = []
    ss = st["settings"]
    lines += [
        "## Training step time (LoRA, forward + backward + AdamW)",
        "",
        f"batch {ss['batch_size']} × {ss['seq_len']} tokens, LoRA r={ss['lora_r']} on all linear projections, "
        f"{ss['dtype']} on {ss['device']}, {ss['timed_steps']} timed steps per variant after {ss['warmup_steps']} "
        f"warm-up, {ss['torch_threads']} torch threads. fq cache: "
        "`quant.patches.cache_frozen_weight_fake_quant` (fq(W) of frozen weights computed once).",
        "",
        "| variant | qat.lora | fq cache | s/step (median) | min–max | × plain | cache on = off (logits) |",
        "|---|---|---|---:|---|---:|---|",
    ]
    for v in st["variants"].values():
        par = st["parity"].get(f"{v['scheme']}/{v['lora_mode']}") if v["scheme"] else None
        lines.append(
            f"| {v['scheme'] or 'plain LoRA'} | {v['lora_mode'] or '—'} | "
            f"{'—' if v['fq_cache'] is None else 'on' if v['fq_cache'] else 'off'} | "
            f"{v['median_s_per_step']:.3f} | {min(v['times_s']):.3f}–{max(v['times_s']):.3f} | "
            f"{_x(v['ratio_vs_plain'])} | "
            f"{'—' if par is None else 'identical' if par['identical'] else '**DIFFERENT**'} |"
        )
    lines += ["", "| scheme / qat.lora | s/step cache off | s/step cache on | off / on |", "|---|---:|---:|---:|"]
    for k, c in st["cache_speedup"].items():
        lines.append(
            f"| {k} | {c['median_s_nocache']:.3f} | {c['median_s_cache']:.3f} | {_x(c['nocache_over_cache'])} |"
        )
    lines += [
        "",
        "Parity (fq cache on vs off, same start, torch.equal on the logits of the training forward and of an "
        "eval forward — `model.eval()` + `no_grad` — before every step and after the last):",
        "",
    ]
    for k, p in st["parity"].items():
        lines.append(
            f"- {k}: {'identical' if p['identical'] else 'DIFFERENT'} over {p['forwards_compared']} forwards "
            f"(training forward {'identical' if p['train_forward_identical'] else 'different'}, eval forward "
            f"{'identical' if p['eval_forward_identical'] else 'different'}; max |Δ| {p['max_abs_diff']:.3g}; "
            f"{p['cached_fake_quantizers']} fake quantizers wrapped)"
        )
    return lines


def _md_train_memory(tm: dict) -> list[str]:
    lines: list[str] = []
    ms = tm["settings"]
    measure = "CUDA max_memory_allocated" if ms["measure"] == "cuda_peak_mb" else "peak RSS above the post-import RSS"
    lines += [
        "",
        "## Training memory",
        "",
        f"One fresh process per variant: load, set up, {ms['steps']} training step(s) at the same batch; "
        f"measure: {measure} (peak RSS = VmHWM of the whole process).",
        "",
        "| variant | qat.lora | fq cache | peak RSS MB | above baseline MB | × plain |",
        "|---|---|---|---:|---:|---:|",
    ]
    for v in tm["variants"].values():
        lines.append(
            f"| {v['scheme'] or 'plain LoRA'} | {v['lora_mode'] or '—'} | "
            f"{'—' if v['fq_cache'] is None else 'on' if v['fq_cache'] else 'off'} | {v['peak_rss_mb']:,.0f} | "
            f"{v['peak_above_baseline_mb']:,.0f} | {_x(v['ratio_vs_plain'])} |"
        )
    return lines


def _md_checkpoint_size(sizes: dict) -> list[str]:
    lines: list[str] = []
    lines += [
        "",
        "## Converted checkpoint size",
        "",
        "PTQ through the convert stage's path (`quant.apply.quantize_ptq` + `attach_hf_quantizer` + "
        "`save_pretrained`). bf16 = 2 bytes/parameter of the original. Floor = quantized weights at the "
        "scheme's bit width + one 16-bit scale per group/channel + every other parameter at 16 bits; "
        "floor@dtype counts the unquantized parameters and scales at the saved dtype.",
        "",
        "| scheme | saved dtype | checkpoint | bf16 | floor | floor@dtype | × bf16 | × floor | × floor@dtype |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sizes.values():
        lines.append(
            f"| {c['scheme']} | {c['saved_dtype']} | {_size(c['weights_bytes'])} | {_size(c['bf16_bytes'])} | "
            f"{_size(c['floor_bytes'])} | {_size(c['floor_at_model_dtype_bytes'])} | {_x(c['ratio_vs_bf16'])} | "
            f"{_x(c['ratio_vs_floor'])} | {_x(c['ratio_vs_floor_at_model_dtype'])} |"
        )
    lines += ["", "Where the bytes go (from the safetensors headers):", ""]
    for c in sizes.values():
        parts = ", ".join(
            f"{role} {_size(b['bytes'])} ({', '.join(f'{d} {_size(n)}' for d, n in b['dtypes'].items())})"
            for role, b in c["breakdown"].items()
        )
        lines.append(f"- {c['scheme']}: {parts}")
    return lines


def _md_decode_latency(decode: dict) -> list[str]:
    lines: list[str] = []
    lines += [
        "",
        "## Decode latency (greedy generate, batch 1)",
        "",
        "Original and converted checkpoint each in its own worker process, taking turns; "
        "latency ratio = converted s / original s per round (median). Scoring: one forward over a batch "
        "of prompts (what the eval stage's log-likelihood scoring does), same ratio.",
        "",
        "| scheme | prompt + new tokens | original tok/s | converted tok/s | latency × original | "
        "scoring × original | peak RSS MB orig / conv | memory × original | greedy tokens = original |",
        "|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for d in decode.values():
        lines.append(
            f"| {d['scheme']} | {d['prompt_len']} + {d['new_tokens']} | {d['original']['tokens_per_s']:.1f} | "
            f"{d['converted']['tokens_per_s']:.1f} | {_x(d['latency_ratio'])} | "
            f"{_x(d['score_ratio'])} (batch {d['score_batch']}) | "
            f"{d['original']['peak_rss_mb']:,.0f} / {d['converted']['peak_rss_mb']:,.0f} | "
            f"{_x(d['memory_ratio'])} | {d['greedy_tokens_matching_original']}/{d['new_tokens']} |"
        )
    mem_note = (
        "CUDA max_memory_allocated"
        if next(iter(decode.values()), {}).get("memory_measure") == "cuda_peak_mb"
        else "peak RSS above the post-import RSS"
    )
    lines += ["", f"Memory ratio: {mem_note}.", ""]
    first = next(iter(decode.values()), None)
    if first and first["original"].get("cuda_peak_reserved_gb") is not None:
        converted = ", ".join(
            f"{d['scheme']} {d['converted']['cuda_peak_reserved_gb']:.2f} GB" for d in decode.values()
        )
        lines += [
            f"CUDA max_memory_reserved (the cards' peak memory, GB = 1e9 bytes): original "
            f"{first['original']['cuda_peak_reserved_gb']:.2f} GB, {converted}.",
            "",
        ]
    return lines


def _md_cli_startup(cs: dict) -> list[str]:
    return [
        "",
        "## CLI start-up",
        "",
        f"`python -m qatkit --help` {cs['qatkit_help_s'] * 1000:.0f} ms vs `python -c pass` "
        f"{cs['python_s'] * 1000:.0f} ms (median of {cs['repeats']}, interleaved): {_x(cs['ratio'])}, "
        f"+{cs['overhead_s'] * 1000:.0f} ms.",
        "",
    ]


def _md_gguf(g: dict) -> list[str]:
    speed, size = g["llamacpp_tok_s"], g["file_bytes"]
    return [
        "## llama.cpp: Q4_0 export vs F16 and transformers fp32",
        "",
        f"Greedy decode of {g['new_tokens']} tokens after a {g['prompt_len']}-token prompt, {g['threads']} threads, "
        "best of the repeats, interleaved.",
        "",
        "| engine, weights | decode tokens/s | file |",
        "|---|---|---|",
        f"| transformers, fp32 | {g['transformers_fp32_tok_s']} | |",
        f"| llama.cpp, F16 | {speed['F16']} | {_size(size['F16'])} |",
        f"| llama.cpp, Q4_0 (qatkit export) | {speed['Q4_0']} | {_size(size['Q4_0'])} |",
        "",
        f"Q4_0 decodes {_x(g['q4_0_vs_fp32_speed'])} as fast as transformers fp32 and {_x(g['q4_0_vs_f16_speed'])} "
        f"as fast as llama.cpp F16, in {g['q4_0_vs_f16_size']:.1%} of the F16 file.",
        "",
    ]


def _md_executorch(e: dict) -> list[str]:
    if "skipped" in e:
        return ["", "## ExecuTorch (.pte, XNNPACK)", "", f"Skipped: {e['skipped']}.", ""]
    ms = e["ms_per_token"]
    return [
        "",
        "## ExecuTorch (.pte, XNNPACK)",
        "",
        f"{e['scheme']} PTQ of the model exported with `qatkit.export.executorch` (KV cache {e['max_seq_len']}; "
        f"lowered in {e['lower_seconds']:.0f} s): {_size(e['pte_bytes'])}, {_x(e['ratio_vs_floor'])} the scheme's "
        f"floor of {_size(e['floor_bytes'])}. Greedy decode, batch 1, {e['prompt_len']} prompt + {e['new_tokens']} "
        "new tokens, ms per new token with the prompt's prefill included; each model in its own worker, taking "
        f"turns ({e['repeats']} rounds, medians).",
        "",
        "| transformers fp32 | converted torchao (eager) | .pte (ExecuTorch) | .pte × fp32 | .pte × converted | "
        "greedy tokens = converted |",
        "|---:|---:|---:|---:|---:|---|",
        f"| {ms['original']:.1f} ms | {ms['converted']:.1f} ms | {ms['pte']:.1f} ms | "
        f"{_x(e['pte_time_ratio_vs_original'])} | {_x(e['pte_time_ratio_vs_converted'])} | "
        f"{e['greedy_tokens_matching_converted']}/{e['new_tokens']} |",
        "",
    ]


MD_SECTIONS = {
    "step_time": _md_step_time,
    "train_memory": _md_train_memory,
    "checkpoint_size": _md_checkpoint_size,
    "decode_latency": _md_decode_latency,
    "gguf": _md_gguf,
    "cli_startup": _md_cli_startup,
    "executorch": _md_executorch,
}


def render_markdown(r: dict) -> str:
    m, load = r["machine"], r["load"]
    whole = load["whole_run"]
    lines = [
        f"# qatkit bench: {r['model']}",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gb']} GB RAM"
        + (f", {m['cuda']}" if m["cuda"] else ", no GPU")
        + f"; torch {m['versions'].get('torch')}, torchao {m['versions'].get('torchao')}, "
        f"transformers {m['versions'].get('transformers')}, peft {m['versions'].get('peft')}; {m['date']}.",
        "",
        f"Load average (1/5/15 min) before: {load['before']['loadavg']}, after: {load['after']['loadavg']}."
        + (
            f" Other processes used {100 * whole['cpu_share_others']:.0f}% of the machine's CPU time during the run "
            f"(this benchmark {100 * whole['cpu_share_bench']:.0f}%)."
            if "cpu_share_others" in whole
            else ""
        ),
        "",
    ]
    th = r.get("threads", {})
    if th:
        why = (
            f"auto: other processes kept {th['others_busy_cores']} of {th['cores']} cores busy just before the run"
            if th.get("policy") == "auto" and th.get("others_busy_cores") is not None
            else th.get("policy", "")
        )
        lines += [f"Timed sections (step time, decode) ran with {th['timed_sections']} torch thread(s) ({why}).", ""]
    if load["shared_with_other_jobs"]:
        lines += [
            "**The machine was shared with other jobs during this run**, so absolute times are noisy and "
            "inflated; the ratios below come from variants interleaved within this one run (A, B, A, B, ...; "
            "medians), which is what to compare.",
            "",
        ]
    lines += [
        "All ratios are measured inside this run. ×plain / ×original: median over rounds of the per-round "
        "ratio (> 1 means slower or bigger).",
        "",
    ]
    for name, render in MD_SECTIONS.items():
        if name in r:
            lines += render(r[name])
    if lines[-1]:
        lines.append("")
    lines += [
        "## Load during each section",
        "",
        "| section | seconds | CPU share of other processes | CPU share of this benchmark | load average after |",
        "|---|---:|---:|---:|---|",
    ]
    for name, sec in load["sections"].items():
        others = f"{100 * sec['cpu_share_others']:.0f}%" if "cpu_share_others" in sec else "n/a"
        own = f"{100 * sec['cpu_share_bench']:.0f}%" if "cpu_share_bench" in sec else "n/a"
        lines.append(f"| {name} | {sec['seconds']:.0f} | {others} | {own} | {sec['loadavg_end']} |")
    lines.append("")
    return "\n".join(lines)
