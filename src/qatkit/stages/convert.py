"""convert stage: merge LoRA, QATConfig(step="convert"), save a checkpoint plain transformers loads.

Parity gate on a fixed batch (SQNR in dB, max abs diff of the logits):
  (a) converted vs the model exactly as trained (fake quant + LoRA in the recipe's mode) — gated;
  (b) converted vs fake quant of the merged model;
  (c) reloaded from disk vs in memory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qatkit import schemes
from qatkit.backends.base import trained_dir
from qatkit.data import chat_prompt, read_items
from qatkit.errors import GateError
from qatkit.loading import load_model_and_tokenizer
from qatkit.metrics import compare, unique_param_count
from qatkit.pipeline import RunDir
from qatkit.recipe import Recipe

log = logging.getLogger(__name__)

FALLBACK_TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Quantization-aware training inserts fake quantizers into the forward pass.",
    "def add(a, b):\n    return a + b\n",
    "Water boils at 100 degrees Celsius at sea level.",
]


def parity_batch(tokenizer, run_dir: RunDir, recipe: Recipe, n: int = 8):
    eval_file = run_dir.root / "data" / "eval.jsonl"
    items = read_items(eval_file)[:n] if eval_file.exists() else []
    style = recipe.data.answer_style if recipe.data else "letter"
    texts = [chat_prompt(tokenizer, it, style) + it.continuations(style)[it.answer] for it in items] or FALLBACK_TEXTS
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)


def logits(model, batch):
    import torch

    with torch.no_grad():
        out = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float().cpu()
    return out[batch["attention_mask"].bool()]


def check_same_quantizers(run_dir: RunDir, model, recipe: Recipe) -> None:
    """The model rebuilt for convert must carry exactly the fake quantizers training used."""
    trained = json.loads((run_dir.stage("finetune") / "qat_plan.json").read_text())
    now = schemes.signature(model)
    if trained.get("lora_mode", recipe.training_mode) != recipe.training_mode:
        raise GateError(
            f"the recipe trains {recipe.training_mode!r} (qat.lora / train.full_finetuning) but training used "
            f"{trained['lora_mode']!r}"
        )
    for fqn in sorted(set(trained["signature"]) | set(now)):
        a, b = trained["signature"].get(fqn), now.get(fqn)
        if a != b:
            raise GateError(
                f"quantizer mismatch at {fqn}: trained with {a or 'no fake quant'}, converting with {b or 'no fake quant'} "
                f"(scheme {recipe.qat.scheme}); convert with the scheme the model was trained with"
            )


def run(recipe: Recipe, run_dir: RunDir, work: Path, resume: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    from qatkit.backends.hf import load_trained

    scheme = schemes.for_recipe(recipe.qat)
    schemes.require_hardware(scheme, "convert")
    if "finetune" in recipe.stages:
        model, tokenizer, plan = load_trained(recipe, trained_dir(recipe, run_dir.stage("finetune")))
        check_same_quantizers(run_dir, model, recipe)
        batch = parity_batch(tokenizer, run_dir, recipe)
        as_trained = logits(model, batch)
        if not recipe.train.full_finetuning:
            model = model.merge_and_unload()
    else:  # PTQ recipe: quantize the original model directly through the same scheme
        model, tokenizer = load_model_and_tokenizer(recipe.model)
        plan = schemes.prepare(model, scheme, recipe.qat.group_size)
        batch = parity_batch(tokenizer, run_dir, recipe)
        as_trained = None
    original_params = unique_param_count(model)
    fake_quant_merged = logits(model, batch)
    converted = schemes.convert(model, scheme, recipe.qat.group_size)
    in_memory = logits(model, batch)

    schemes.attach_hf_quantizer(model, converted)
    model.save_pretrained(str(work))
    tokenizer.save_pretrained(str(work))
    reloaded = AutoModelForCausalLM.from_pretrained(str(work))
    parity = {
        "as_trained_vs_converted": compare(as_trained, in_memory) if as_trained is not None else None,
        "fake_quant_merged_vs_converted": compare(fake_quant_merged, in_memory),
        "reloaded_vs_in_memory": compare(logits(reloaded, batch), in_memory),
        "qat_lora_mode": recipe.training_mode,
        "threshold_db": recipe.convert.parity_min_sqnr,
        "tokens": int(batch["attention_mask"].sum()),
    }
    (work / "parity.json").write_text(json.dumps(parity, indent=2))
    (work / "qat_plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
    size = sum(f.stat().st_size for f in work.glob("*.safetensors"))
    run_dir.update_manifest(parity=parity)
    gated = parity["as_trained_vs_converted"] or parity["fake_quant_merged_vs_converted"]
    if gated["sqnr_db"] < recipe.convert.parity_min_sqnr:
        why = (
            "LoRA was trained outside the quantizer (qat.lora: unmerged); qat.lora: merged trains the deployed forward"
            if recipe.qat.lora == "unmerged" and "finetune" in recipe.stages
            else "the deployed quantizer does not match the trained one"
        )
        raise GateError(
            f"parity gate failed: converted vs as-trained logits SQNR {gated['sqnr_db']:.1f} dB "
            f"< convert.parity_min_sqnr={recipe.convert.parity_min_sqnr} dB: {why}"
        )
    return {
        "quantized_modules": len(converted),
        "skipped_modules": len(plan.skipped),
        "checkpoint_bytes": size,
        "original_bf16_mb": round(original_params * 2 / 2**20, 2),
        "parity_sqnr_db": {k: v["sqnr_db"] for k, v in parity.items() if isinstance(v, dict)},
    }
