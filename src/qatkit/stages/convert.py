"""convert stage: merge LoRA, QATConfig(step="convert"), save a checkpoint plain transformers loads.

Parity gate on a fixed batch (SQNR in dB, max abs diff of the logits):
  (a) converted vs the model exactly as trained (fake quant + LoRA in the recipe's mode) — gated;
  (b) converted vs fake quant of the merged model;
  (c) reloaded from disk vs in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qatkit.core.errors import GateError
from qatkit.core.metrics import compare, unique_param_count
from qatkit.data import chat_prompt, read_items
from qatkit.models.assembly import load_trained
from qatkit.models.loading import load_model_and_tokenizer
from qatkit.quant.apply import attach_hf_quantizer, convert, prepare
from qatkit.quant.hardware import require_hardware
from qatkit.quant.patches import signature
from qatkit.recipe import Recipe
from qatkit.run.layout import ConvertDir
from qatkit.run.records import Parity, QatPlanRecord
from qatkit.run.rundir import RunDir

log = logging.getLogger(__name__)

FALLBACK_TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Quantization-aware training inserts fake quantizers into the forward pass.",
    "def add(a, b):\n    return a + b\n",
    "Water boils at 100 degrees Celsius at sea level.",
]


def parity_batch(tokenizer, run_dir: RunDir, recipe: Recipe, n: int = 8):
    items = read_items(run_dir.eval_data)[:n] if run_dir.eval_data.exists() else []
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
    trained = QatPlanRecord.load(run_dir.finetune.qat_plan)
    now = signature(model)
    if (trained.lora_mode or recipe.training_mode) != recipe.training_mode:
        raise GateError(
            f"the recipe trains {recipe.training_mode!r} (qat.lora / train.full_finetuning) but training used "
            f"{trained.lora_mode!r}"
        )
    for fqn in sorted(set(trained.signature) | set(now)):
        a, b = trained.signature.get(fqn), now.get(fqn)
        if a != b:
            raise GateError(
                f"quantizer mismatch at {fqn}: trained with {a or 'no fake quant'}, converting with {b or 'no fake quant'} "
                f"(scheme {recipe.quant.name}); convert with the scheme the model was trained with (a run trained before "
                "its scheme's grid changed, e.g. int8-int4 before bf16 scales, must be trained again)"
            )


def run(recipe: Recipe, run_dir: RunDir, work: Path, resume: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    spec = recipe.quant
    require_hardware(spec.scheme, "convert")
    if "finetune" in recipe.stages:
        model, tokenizer, plan = load_trained(recipe, run_dir.finetune.trained(recipe.train.full_finetuning))
        check_same_quantizers(run_dir, model, recipe)
        batch = parity_batch(tokenizer, run_dir, recipe)
        as_trained = logits(model, batch)
        if not recipe.train.full_finetuning:
            model = model.merge_and_unload()
    else:  # PTQ recipe: quantize the original model directly through the same scheme
        model, tokenizer = load_model_and_tokenizer(recipe.model)
        plan = prepare(model, spec)
        batch = parity_batch(tokenizer, run_dir, recipe)
        as_trained = None
    original_params = unique_param_count(model)
    fake_quant_merged = logits(model, batch)
    converted = convert(model, spec)
    in_memory = logits(model, batch)

    attach_hf_quantizer(model, converted)
    model.save_pretrained(str(work))
    tokenizer.save_pretrained(str(work))
    # loaded where the converted model lives: torchao's CUDA tensors (int4, fp8) only run there
    on_device = {} if model.device.type == "cpu" else {"device_map": {"": model.device}}
    reloaded = AutoModelForCausalLM.from_pretrained(str(work), **on_device)
    parity = Parity(
        as_trained_vs_converted=compare(as_trained, in_memory) if as_trained is not None else None,
        fake_quant_merged_vs_converted=compare(fake_quant_merged, in_memory),
        reloaded_vs_in_memory=compare(logits(reloaded, batch), in_memory),
        qat_lora_mode=recipe.training_mode,
        threshold_db=recipe.convert.parity_min_sqnr,
        tokens=int(batch["attention_mask"].sum()),
    )
    files = ConvertDir(work)
    parity.save(files.parity)
    QatPlanRecord.from_plan(plan).save(files.qat_plan)
    run_dir.update_manifest(parity=parity.to_dict())
    gate_parity(parity, recipe)
    return {
        "quantized_modules": len(converted),
        "skipped_modules": len(plan.skipped),
        "checkpoint_bytes": files.weights_bytes(),
        "original_bf16_mb": round(original_params * 2 / 2**20, 2),
        "parity_sqnr_db": parity.sqnr_by_comparison(),
    }


def gate_parity(parity: Parity, recipe: Recipe) -> None:
    """Exit 4 when the converted model is not the model as trained (within convert.parity_min_sqnr)."""
    sqnr = parity.gated["sqnr_db"]
    if sqnr < recipe.convert.parity_min_sqnr:
        why = (
            "LoRA was trained outside the quantizer (qat.lora: unmerged); qat.lora: merged trains the deployed forward"
            if recipe.qat.lora == "unmerged" and "finetune" in recipe.stages
            else "the deployed quantizer does not match the trained one"
        )
        raise GateError(
            f"parity gate failed: converted vs as-trained logits SQNR {sqnr:.1f} dB "
            f"< convert.parity_min_sqnr={recipe.convert.parity_min_sqnr} dB: {why}"
        )
