"""Assemble a model for training or conversion: QAT fake quantizers first, then LoRA adapters (new, or trained ones
loaded back), so that convert rebuilds exactly the forward that was trained."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qatkit.core.errors import RecipeError
from qatkit.models.loading import load_model_and_tokenizer
from qatkit.models.merged_lora import use_merged_lora_forward
from qatkit.quant.apply import prepare
from qatkit.quant.plan import Plan, lora_exclude_pattern
from qatkit.quant.scales import load_learned_scales
from qatkit.run.layout import AWQ_SCALES, CONTROL_ADAPTER, GPTQ_WEIGHTS, LEARNED_SCALES, FinetuneDir, RunLayout

if TYPE_CHECKING:
    from qatkit.recipe import Recipe


def lora_config(recipe: Recipe, exclude_modules: str | None = None):
    from peft import LoraConfig

    return LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=list(recipe.lora.target_modules),
        exclude_modules=exclude_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def prepare_for_qat(recipe: Recipe, model) -> Plan:
    """Fake quantizers go on the base linears first; LoRA modules are added after and never quantized."""
    return prepare(model, recipe.quant)


def attach_lora(recipe: Recipe, model, adapter_dir: Path | None = None, trainable: bool = False):
    """Wrap a QAT-prepared model with LoRA: new adapters, or trained ones from `adapter_dir`."""
    from peft import PeftModel, get_peft_model

    if adapter_dir is None:  # text-only training: no adapters on vision/audio towers
        model = get_peft_model(model, lora_config(recipe, lora_exclude_pattern(model)))
    else:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    if recipe.qat.lora == "merged":
        use_merged_lora_forward(model)
    return model


def load_trained(recipe: Recipe, trained: Path):
    """Rebuild the model exactly as it was trained: base + fake quant + LoRA (in the recipe's mode), or the
    fully fine-tuned weights + fake quant."""
    full = recipe.train.full_finetuning
    if recipe.qat.init_from == "control-merged":  # the weights QAT trained on: the base with the control merged
        model, tokenizer = load_finetuned(recipe, _merged_control(trained))
    else:
        model, tokenizer = load_model_and_tokenizer(recipe.model, path=str(trained) if full else None)
    plan = prepare_for_qat(recipe, model)
    if not full:  # a full fine-tune saved its weights as trained, scaled and all
        if recipe.qat.awq:
            from qatkit.quant.awq import load_awq_scales

            load_awq_scales(model, trained / AWQ_SCALES, recipe.qat.awq.channels)
        if recipe.qat.gptq:  # the adapter was trained on the GPTQ weights, not the model's own
            from qatkit.quant.gptq import load_gptq_weights

            load_gptq_weights(model, trained / GPTQ_WEIGHTS)
        model = attach_lora(recipe, model, trained)
    if recipe.qat.learn_scales:
        load_learned_scales(model, trained / LEARNED_SCALES)
    return model, tokenizer, plan


def _merged_control(trained: Path) -> Path:
    adapter = trained / CONTROL_ADAPTER
    if not adapter.is_dir():
        raise RecipeError(
            f"{adapter} is missing: the run was trained on the control's adapters merged into the weights "
            "(qat.init_from: control-merged), they are needed"
        )
    return adapter


def load_checkpoint(recipe: Recipe, run: RunLayout, checkpoint: Path):
    """A trainer checkpoint of `run` rebuilt as trained (load_trained): its adapter and learned scales, with the GPTQ
    weights or AWQ scales the run started from, which its fine-tune (finished or not) keeps beside what it trains and
    not in its checkpoints. The finished fine-tune's own folder (finetune/adapter) holds them already and loads too."""
    import tempfile

    started_from = FinetuneDir(run.stage_so_far("finetune")).trained(recipe.train.full_finetuning)
    with tempfile.TemporaryDirectory() as tmp:
        trained = Path(tmp)
        for f in checkpoint.iterdir():
            (trained / f.name).symlink_to(f.resolve())
        merged_control = recipe.qat.init_from == "control-merged"
        for start, needed in (
            (GPTQ_WEIGHTS, recipe.qat.gptq),
            (AWQ_SCALES, recipe.qat.awq),
            (CONTROL_ADAPTER, merged_control),
        ):
            if needed and not (trained / start).exists():
                (trained / start).symlink_to((started_from / start).resolve())
        return load_trained(recipe, trained)


def load_finetuned(recipe: Recipe, trained: str | Path):
    """A fine-tune without fake quantization (the no-QAT control): its full weights, or the recipe's model with the
    LoRA adapter in `trained` merged in."""
    if recipe.train.full_finetuning:
        return load_model_and_tokenizer(recipe.model, path=str(trained))
    from peft import PeftModel

    model, tokenizer = load_model_and_tokenizer(recipe.model)
    return PeftModel.from_pretrained(model, str(trained)).merge_and_unload(), tokenizer
