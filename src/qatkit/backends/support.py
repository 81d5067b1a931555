"""What each training backend can run, decided from the recipe and the machine alone (no backend is imported), so
backend selection and validation never pull in Unsloth or TRL."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from qatkit.core.errors import RecipeError

if TYPE_CHECKING:
    from qatkit.recipe import Recipe


def unsloth_usable() -> tuple[bool, str]:
    """Whether Unsloth can train here, and why not."""
    if importlib.util.find_spec("unsloth") is None:
        return False, "unsloth is not installed (pip install 'qatkit[unsloth]')"
    import torch

    if not torch.cuda.is_available():
        return False, "unsloth needs a CUDA GPU (it silently drops qat_scheme on CPU)"
    return True, ""


def check_unsloth_recipe(recipe: Recipe) -> None:
    """What Unsloth cannot train faithfully; raised before anything loads. The hf backend trains every recipe."""
    spec = recipe.quant
    if recipe.qat.lora == "merged":
        raise RecipeError(
            "backend unsloth trains LoRA unmerged (its fused LoRA kernels compute fq(W)x + s·BAx): "
            "set qat.lora: unmerged, or use backend: hf for qat.lora: merged"
        )
    if recipe.train.full_finetuning:
        raise RecipeError(
            "qatkit's Unsloth backend trains LoRA adapters only: use backend: hf for train.full_finetuning"
        )
    if recipe.qat.learn_scales:
        raise RecipeError(
            "backend unsloth applies its qat_scheme's fake quantizers itself (scales computed every step): "
            "use backend: hf for qat.learn_scales"
        )
    if recipe.distill is not None:
        raise RecipeError("qatkit's Unsloth backend trains with cross-entropy only: use backend: hf for distill")
    if recipe.qat.awq is not None:
        raise RecipeError("qatkit's Unsloth backend trains the model's own weights: use backend: hf for qat.awq")
    if recipe.qat.init_from != "base":
        raise RecipeError("qatkit's Unsloth backend starts QAT from the base model: use backend: hf for qat.init_from")
    if spec.scheme.weight_fake_quantizer is not None:
        raise RecipeError(
            f"scheme {spec.name} trains with qatkit's own weight fake quantizer, which Unsloth's qat_scheme (torchao's "
            "fake quantizers) cannot apply: use backend: hf for this scheme"
        )
    if spec.quantize_lm_head or spec.quantizes_embeddings:
        raise RecipeError(
            f"scheme {spec.name} fake-quantizes lm_head/embeddings, but Unsloth's fused cross-entropy reads "
            "lm_head.weight directly and would skip that fake quantizer: use backend: hf for this scheme"
        )
