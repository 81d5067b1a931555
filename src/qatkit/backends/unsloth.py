"""unsloth backend: Unsloth's fused LoRA kernels with torchao fake quantization (CUDA only).

Import order: Unsloth patches transformers, peft and trl when it is imported, so in the training process
`import unsloth` must come before those libraries are imported; imported later, Unsloth warns and some of
its patches are missing. qatkit imports Unsloth only inside this backend (`import_unsloth`), never at
module import, so `qatkit --help` and the hf backend never pay for it.

What Unsloth does with `get_peft_model(..., qat_scheme="int4")` (unsloth/models/_utils.py,
`_prepare_model_for_qat`): it adds LoRA first, then fake-quantizes *every* nn.Linear with
in_features >= 128, which includes lm_head and the LoRA A matrices, and for `int8-int4` on Gemma-3 it
silently switches to int4. qatkit's convert stage rebuilds the trained forward from qatkit's own module
plan, so the string would train a different set of quantizers than the one converted. Instead this
backend passes Unsloth's own `TorchAOConfig` (which `qat_scheme` accepts) built from the qatkit scheme:
the same torchao base configs, restricted to exactly the modules of `quant.plan.plan_modules`. After setup
it checks that those fake quantizers really are in the model, because Unsloth drops `qat_scheme`
without a word on CPU and on some paths (FastLanguageModel.get_peft_model for FastModel families).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from qatkit.backends.support import check_unsloth_recipe
from qatkit.backends.trainer import sft_trainer, train_and_save
from qatkit.core import distributed
from qatkit.core.errors import EnvError
from qatkit.models.loading import check_model_available, materialize_gguf, resolve_model, torch_dtype
from qatkit.quant.patches import cache_frozen_weight_fake_quant, fake_quantizers, signature, use_straight_through_fp8
from qatkit.quant.plan import Plan, plan_modules, stable_fqn
from qatkit.run.layout import FinetuneDir
from qatkit.run.records import QatPlanRecord, TrainResult

if TYPE_CHECKING:
    from qatkit.recipe import Recipe

log = logging.getLogger(__name__)

# model types FastLanguageModel patches itself (unsloth/models/loader.py dispatch); every other family is
# loaded by FastModel, and FastLanguageModel.get_peft_model drops `qat_scheme` for those.
FAST_LANGUAGE_MODEL_TYPES = frozenset({"llama", "mistral", "gemma", "gemma2", "qwen2", "qwen3"})
PATCHED_BY_UNSLOTH = ("transformers", "peft", "trl")


def entry_point(model_type: str) -> str:
    """The Unsloth class to load `model_type` with: FastLanguageModel for the families it patches, else FastModel."""
    return "FastLanguageModel" if model_type in FAST_LANGUAGE_MODEL_TYPES else "FastModel"


def import_unsloth():
    """Import Unsloth (it must come before transformers/peft/trl in the process; see the module docstring)."""
    if importlib.util.find_spec("unsloth") is None:
        raise EnvError("backend unsloth: unsloth is not installed (pip install 'qatkit[unsloth]' on a CUDA machine)")
    early = [name for name in PATCHED_BY_UNSLOTH if name in sys.modules and "unsloth" not in sys.modules]
    if early:
        log.warning(
            "%s imported before unsloth: Unsloth's patches may be incomplete (import unsloth first)", ", ".join(early)
        )
    try:
        return importlib.import_module("unsloth")
    except Exception as e:  # unsloth raises NotImplementedError/ImportError/RuntimeError without a usable GPU
        raise EnvError(f"backend unsloth: import unsloth failed ({type(e).__name__}: {e})") from None


def qat_rules(recipe: Recipe) -> tuple[list[tuple[object, object]], object, dict]:
    """(base_config, filter_fn) pairs and a pre-quantization hook for Unsloth's TorchAOConfig.

    Unsloth calls the hook with the LoRA-wrapped model right before `quantize_(model, QATConfig(cfg,
    step="prepare"), filter_fn)` for each pair; the hook computes qatkit's module plan on that model
    (into `state["plan"]`), and the filters select exactly the plan's linears: the base layers of LoRA
    modules and the other linears the scheme covers, never LoRA A/B, never modules outside the
    language model. `check_unsloth_recipe` has refused schemes that quantize lm_head or embeddings.
    """
    spec = recipe.quant
    state: dict = {}

    def plan_on(model) -> None:
        plan = plan_modules(model, spec)
        state["plan"] = plan
        state["linears"] = {m.fqn for m in plan.quantized if m.kind == "linear"}

    def selected(module, fqn: str) -> bool:
        return fqn in state.get("linears", ())

    return [(spec.linear_config(), selected)], plan_on, state


def unsloth_qat_config(recipe: Recipe) -> tuple[object, dict]:
    """Unsloth's TorchAOConfig for the recipe's scheme (pass it as `qat_scheme=`), and the plan holder."""
    try:
        from unsloth.models._utils import TorchAOConfig
    except ImportError as e:
        raise EnvError(f"this unsloth has no TorchAOConfig ({e}); pip install 'qatkit[unsloth]'") from None
    rules, hook, state = qat_rules(recipe)
    return TorchAOConfig(
        qat_scheme=recipe.qat.scheme, base_config_and_filter_fns=rules, prequantization_transform=hook
    ), state


def verify_fake_quant(model, plan: Plan | None) -> dict[str, str]:
    """The fake quantizers really are in the model, on exactly the planned modules; returns the signature."""
    if not fake_quantizers(model) or plan is None:
        what = "without any fake quantizer" if not fake_quantizers(model) else "without qatkit's TorchAOConfig"
        raise EnvError(
            f"Unsloth set the model up {what}: qat_scheme was dropped (Unsloth does that on CPU and for some "
            "model families), so this would not train the planned QAT; use backend: hf"
        )
    found = signature(model)
    expected = {stable_fqn(m.fqn) for m in plan.quantized}
    if set(found) != expected:
        extra, missing = sorted(set(found) - expected), sorted(expected - set(found))
        raise EnvError(
            f"Unsloth fake-quantized other modules than qatkit planned (unexpected: {extra[:3]}, "
            f"missing: {missing[:3]}); convert could not rebuild the trained forward; use backend: hf"
        )
    return found


def _model_path(recipe: Recipe) -> str:
    """A local directory or cached hub id (GGUF files are dequantized once, like the hf backend does)."""
    source = resolve_model(recipe.model.name_or_path)
    check_model_available(source)
    return materialize_gguf(source).path


class UnslothBackend:
    name = "unsloth"

    def finetune(
        self,
        recipe: Recipe,
        examples: list[dict],
        work: Path,
        resume: bool,
        qat: bool = True,
        control: Path | None = None,
    ) -> TrainResult:
        """Train LoRA adapters into `work` like the hf backend (same files, so convert works unchanged); no
        distillation (check_recipe refuses it), so `control` is unused."""

        check_unsloth_recipe(recipe)
        unsloth = import_unsloth()  # before transformers/peft/trl
        from transformers import AutoConfig
        from trl import SFTTrainer

        t0 = time.time()
        path = _model_path(recipe)
        model_type = AutoConfig.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code).model_type
        entry = getattr(unsloth, entry_point(model_type))
        t = recipe.train
        model, tokenizer = entry.from_pretrained(
            model_name=path,
            max_seq_length=recipe.model.max_seq_length,
            dtype=None if recipe.model.dtype == "auto" else torch_dtype(recipe.model.dtype),
            load_in_4bit=False,  # QAT needs the 16-bit weights; load_in_4bit + qat_scheme fails
            load_in_8bit=False,
            full_finetuning=False,
            use_exact_model_name=True,  # no remapping to unsloth/* repos: convert loads the same weights
            trust_remote_code=recipe.model.trust_remote_code,
            random_state=t.seed,
        )
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # FastModel returns a processor for VLMs
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        peft_args = dict(
            r=recipe.lora.r,
            lora_alpha=recipe.lora.alpha,
            lora_dropout=recipe.lora.dropout,
            target_modules=list(recipe.lora.target_modules),
            bias="none",
            use_gradient_checkpointing="unsloth" if t.gradient_checkpointing else False,
            random_state=t.seed,
        )
        if entry.__name__ == "FastModel":  # text-only training: language layers only (Gemma-3 card)
            peft_args.update(finetune_vision_layers=False, finetune_language_layers=True)
        state: dict = {}
        if qat:
            peft_args["qat_scheme"], state = unsloth_qat_config(recipe)
        model = entry.get_peft_model(model, **peft_args)
        if qat:
            trained_signature = verify_fake_quant(model, state.get("plan"))
            if distributed.is_main():
                record = QatPlanRecord.from_plan(state["plan"], recipe.qat.lora, trained_signature)
                record.save(FinetuneDir(work).qat_plan)
            if recipe.quant.scheme.straight_through_fp8:
                use_straight_through_fp8(model)
            if recipe.qat.cache_frozen_fake_quant:
                cache_frozen_weight_fake_quant(model)

        trainer = sft_trainer(SFTTrainer, recipe, model, tokenizer, examples, FinetuneDir(work).checkpoints, False, qat)
        return train_and_save(
            trainer, model, tokenizer, work, FinetuneDir(work).trained(full_finetuning=False), resume, t0
        )
