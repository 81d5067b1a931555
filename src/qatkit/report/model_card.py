"""Model card (convert/README.md) in the seed cards' structure, with Hub front matter."""

from __future__ import annotations

import yaml

from qatkit.report.tables import data_sources, executorch_summary, gguf_lines, quality_table, text_nll_table

INFERENCE = [
    "# Inference with Transformers",
    "",
    "```python",
    "import torch",
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    'model_id = "path/to/this/checkpoint"',
    "tokenizer = AutoTokenizer.from_pretrained(model_id)",
    'model = AutoModelForCausalLM.from_pretrained(model_id, device_map="auto")',
    'messages = [{"role": "user", "content": "Give me a short introduction to large language models."}]',
    'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(model.device)',
    "out = model.generate(**inputs, max_new_tokens=128)",
    "print(tokenizer.decode(out[0][inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
    "```",
    "",
    "# Inference with vLLM",
    "",
    "```shell",
    "vllm serve path/to/this/checkpoint --tokenizer path/to/this/checkpoint",
    "```",
    "",
]
DISCLAIMER = [
    "# Disclaimer",
    "",
    "No safety evaluation was performed. Outputs may differ from the original model; the base model's license applies.",
    "",
]
TEACHERS = {"control": "the same fine-tune without fake quantization", "base": "the unquantized base model"}


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith(("pkg:", "/", ".", "~"))


def _header(report: dict, recipe: dict, base: str, method: str) -> list[str]:
    model, scheme = recipe["model"], report["scheme"]
    front = {
        **({"base_model": base} if model.get("hub_id") or _looks_like_hub_id(base) else {}),
        "tags": ["transformers", "torchao", "qatkit", "quantized", scheme],
        "license": model.get("license") or "other",
        "library_name": "transformers",
    }
    return [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {method}: {base}",
        "",
        f"- **Quantized from model:** {base}",
        f"- **Quantization method:** {method} (torchao, scheme `{report.get('quantization', scheme)}`)",
        f"- **Made with:** qatkit recipe `{recipe['name']}`",
        "",
    ]


def _how_trained(report: dict, recipe: dict, base: str) -> list[str]:
    """One paragraph: what was fine-tuned, under which fake quantization, from which teacher."""
    qat, full = recipe["qat"], bool(recipe["train"].get("full_finetuning"))
    how = "fully fine-tuned" if full else "fine-tuned with LoRA"
    mode = "" if full else f", LoRA mode `{qat['lora']}`"
    scales = "; weight scales learned too" if qat.get("learn_scales") else ""
    if scales and qat.get("scale_space") == "log":
        scales += " (stepped in log space)"
    if qat.get("gptq"):
        scales += "; starting from GPTQ weights instead of rounded ones"
    if awq := qat.get("awq"):
        channels = awq.get("channels", ["mlp_hidden"])  # runs before qat.awq.channels scaled mlp_hidden only
        named = " and ".join(c.removeprefix("mlp_") for c in channels)
        scales += f"; starting from AWQ's activation-aware scaling of the MLPs' {named} channels"
    distill = recipe.get("distill")
    taught = f", distilling from {TEACHERS[distill['teacher']]}" if distill else ""
    if distill and distill.get("tokens") == "all":
        taught += " on every token, prompt included"
    if distill and (general := distill.get("general")):
        paths = [general["path"], *(m["path"] for m in general.get("mix", ()))]
        source = "sequences the teacher sampled itself" if paths == ["teacher"] else ", ".join(f"`{p}`" for p in paths)
        taught += f", and on every token of general text beside the task ({source})"
    first = f"{base} {how}"
    if qat.get("init_from") == "control":
        first += " without fake quantization, then trained further"
    elif qat.get("init_from") == "control-merged":
        first += " without fake quantization, its adapters merged into the weights, then new adapters trained"
    return [
        f"{first} under quantization-aware training (fake quantization of the `{report['scheme']}` "
        f"scheme in the forward pass{mode}{scales}{taught}), then converted to real low-bit torchao tensors "
        "with the same quantizer.",
        "",
    ]


def _recipe_section(recipe: dict) -> list[str]:
    t, lora, qat = recipe["train"], recipe["lora"], recipe["qat"]
    trained = (
        "Full fine-tuning"
        if t.get("full_finetuning")
        else f"LoRA r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
        f"targets {', '.join(lora['target_modules'])}"
    )
    qat_steps, qat_lr = (
        f" (under quantization-aware training: {qat[k]})" if qat.get(k) else "" for k in ("max_steps", "lr")
    )
    data = " + ".join(f"`{source['path']}`" for source in data_sources(recipe.get("data")))
    return [
        "# Fine-tuning recipe",
        "",
        f"{trained}; {t['max_steps']} steps{qat_steps}, batch {t['batch_size']} x {t['grad_accum']}, lr {t['lr']}{qat_lr}, "
        f"{t['lr_scheduler']} schedule, "
        f"warmup {t['warmup_steps']}, optimizer {t['optim']}, seed {t['seed']}; data {data or 'none'}.",
        "",
        "```yaml",
        yaml.safe_dump(recipe, sort_keys=False).strip(),
        "```",
        "",
        "Reproduce: `qatkit run recipe.yaml`.",
        "",
    ]


def render_model_card(report: dict, recipe: dict) -> str:
    base = recipe["model"].get("hub_id") or recipe["model"]["name_or_path"]
    finetuned = report["training"] is not None
    method = f"QAT {report['scheme']}" if finetuned else f"PTQ {report['scheme']}"
    lines = _header(report, recipe, base, method)
    if finetuned:
        lines += _how_trained(report, recipe, base)
    lines += INFERENCE
    if report.get("gguf"):
        lines += [
            "# Inference with llama.cpp and Ollama",
            "",
            "The run's `export/model.gguf`:",
            "",
            "```shell",
            'llama-cli -m model.gguf -p "Give me a short introduction to large language models." -n 128',
            "printf 'FROM ./model.gguf\\n' > Modelfile && ollama create my-qat-model -f Modelfile && ollama run my-qat-model",
            "```",
            "",
            *gguf_lines(report["gguf"]),
            "",
        ]
    if report.get("executorch"):
        lines += ["# Running on a phone with ExecuTorch", "", executorch_summary(report["executorch"]), ""]
    if finetuned:
        lines += _recipe_section(recipe)
    lines += ["# Model quality", ""]
    lines += [quality_table(report["quality"]), ""] if report["quality"] else ["(not evaluated)", ""]
    if report.get("text_nll"):
        lines += ["General text the model never trained on:", "", text_nll_table(report["text_nll"]), ""]
    if report.get("checkpoint_mb"):
        lines += ["# Size", "", f"Checkpoint on disk: {report['checkpoint_mb']} MB.", ""]
    return "\n".join(lines + DISCLAIMER)
