"""`qatkit validate`: everything that can be checked before a model loads, plus the module plan."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from qatkit import schemes
from qatkit.backends.base import backend_name
from qatkit.data import load_splits
from qatkit.errors import EnvError
from qatkit.loading import ModelSource, check_model_available, resolve_model
from qatkit.metrics import unique_param_count
from qatkit.recipe import Recipe

# bits per weight of each scheme's quantized linears (before scales)
WEIGHT_BITS = {
    "int4": 4,
    "int8": 8,
    "int8-int4": 4,
    "w4-intx": 4,
    "w4-channel": 4,
    "fp8-int4": 4,
    "fp8-fp8": 8,
    "nvfp4": 4,
    "mxfp8": 8,
}


@dataclass
class Validation:
    recipe: Recipe
    source: ModelSource
    plan: schemes.Plan | None = None
    by_type: dict[str, Counter] = field(default_factory=dict)
    size_bf16_mb: float | None = None
    size_quantized_mb: float | None = None


def preflight(recipe: Recipe) -> ModelSource:
    """Checks shared by `validate` and `run`, before any model loads: library versions, hardware,
    backend, model reachable, data parses and splits, eval tasks known and available offline."""
    check_versions()
    scheme = schemes.for_recipe(recipe.qat)
    if "finetune" in recipe.stages:
        schemes.require_hardware(scheme, "train")
        backend_name(recipe)
    if "convert" in recipe.stages:
        schemes.require_hardware(scheme, "convert")
    source = resolve_model(recipe.model.name_or_path)
    check_model_available(source)
    if recipe.data is not None:
        load_splits(recipe.data)  # parses every row: missing, empty or malformed data fails here
    if "eval" in recipe.stages:
        from qatkit.stages.eval import preflight as eval_preflight

        eval_preflight(list(recipe.eval.tasks), [recipe.eval.include_path] if recipe.eval.include_path else [])
    return source


# the APIs qatkit relies on: QATConfig(step=...) + FqnToConfig (torchao), TorchAoConfig(FqnToConfig) (transformers 5)
SUPPORTED = {
    "torchao": ("0.16", "0.19"),
    "transformers": ("5.0", "6.0"),
    "peft": ("0.17", "1.0"),
    "trl": ("1.0", "2.0"),
}


def check_versions() -> None:
    """Refuse library versions outside the range qatkit is built for, with the fix."""
    from importlib import metadata

    from packaging.version import Version

    for package, (low, high) in SUPPORTED.items():
        try:
            found = metadata.version(package)
        except metadata.PackageNotFoundError:
            raise EnvError(
                f"{package} is not installed: pip install 'qatkit' installs the supported versions"
            ) from None
        if not Version(low) <= Version(found) < Version(high):
            raise EnvError(
                f"{package} {found} is not supported (need >={low},<{high}): pip install -e . restores the pinned versions"
            )


def _config(source: ModelSource, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise EnvError(f"cannot read the config of {source.describe()}: {str(e).splitlines()[0]}") from None


def validate(recipe: Recipe) -> Validation:
    """Preflight, then build the model on the meta device (no weights) to list what will be quantized."""
    import torch
    from transformers import AutoModelForCausalLM

    source = preflight(recipe)
    result = Validation(recipe, source)
    config = _config(source, recipe.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    scheme = schemes.for_recipe(recipe.qat)
    plan = schemes.plan_modules(model, scheme, recipe.qat.group_size)
    result.plan = plan
    for m in plan.modules:
        leaf = m.fqn.rsplit(".", 1)[-1]
        key = f"{m.kind} {leaf}"
        result.by_type.setdefault(key, Counter())["quantize" if m.quantize else m.reason] += 1
    total = unique_param_count(model)
    quantized_params = sum(m.shape[0] * m.shape[1] for m in plan.quantized)
    gs = plan.group_size
    bits = WEIGHT_BITS[scheme.name] + (16 / gs if gs else 0)
    emb_params = sum(m.shape[0] * m.shape[1] for m in plan.quantized if m.kind == "embedding")
    lin_params = quantized_params - emb_params
    extra_lm_head = 0
    if plan.untie_embeddings:
        out = model.get_output_embeddings()
        extra_lm_head = out.weight.numel()
    result.size_bf16_mb = round(total * 2 / 2**20, 1)
    result.size_quantized_mb = round(
        ((total + extra_lm_head - quantized_params) * 2 + lin_params * bits / 8 + emb_params * 8 / 8) / 2**20, 1
    )
    return result
