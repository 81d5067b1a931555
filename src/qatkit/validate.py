"""`qatkit validate`: everything that can be checked before a model loads, plus the module plan."""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qatkit.backends.base import backend_name
from qatkit.core.errors import EnvError, RecipeError
from qatkit.core.metrics import unique_param_count
from qatkit.data import load_splits
from qatkit.evaluation.lmeval import HELDOUT, check_tasks_available
from qatkit.models.loading import ModelSource, check_model_available, resolve_model
from qatkit.quant.hardware import require_hardware
from qatkit.quant.plan import Plan, non_language_modules, plan_modules
from qatkit.recipe import Recipe, TrainSpec, did_you_mean

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class Validation:
    recipe: Recipe
    source: ModelSource
    plan: Plan | None = None
    by_type: dict[str, Counter] = field(default_factory=dict)
    size_bf16_mb: float | None = None
    size_quantized_mb: float | None = None


def preflight(recipe: Recipe, stages: list[str] | None = None) -> ModelSource:
    """Checks shared by `validate` and `run`, before any model loads, for the `stages` about to run (default: the
    recipe's): library versions, hardware, backend, model reachable, LoRA targets exist, data parses and splits,
    eval tasks known and available offline."""
    check_versions()
    stages = stages or recipe.stages
    scheme = recipe.quant.scheme
    if "finetune" in stages:
        require_hardware(scheme, "train")
        backend_name(recipe)
    if "convert" in stages:
        require_hardware(scheme, "convert")
    if "finetune" in stages:  # after every hardware check: a missing GPU is the more basic problem
        check_trainer_settings(recipe.train)
        warn_if_warmup_outlasts_training(recipe)
    source = resolve_model(recipe.model.name_or_path)
    check_model_available(source)
    if {"finetune", "convert"} & set(stages):
        model = _meta_model(source, recipe.model.trust_remote_code)
        check_plan(plan_modules(model, recipe.quant))
        if "finetune" in stages and not recipe.train.full_finetuning:
            check_lora_targets(model, recipe.lora.target_modules)
    splits = load_splits(recipe.data) if recipe.data is not None else None  # parses every row
    if "eval" in stages:
        if HELDOUT in recipe.eval.tasks and splits is not None and not splits.eval:
            raise RecipeError(
                f"eval.tasks: '{HELDOUT}' scores held-out multiple-choice items, and {' + '.join(s.path for s in recipe.data.sources)} gives none "
                "(its rows are not multiple-choice, or data.eval_size is 0): set data.eval_path to a multiple-choice "
                f"file, or leave '{HELDOUT}' out of eval.tasks"
            )

        check_tasks_available(list(recipe.eval.tasks), [recipe.eval.include_path] if recipe.eval.include_path else [])
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


@functools.lru_cache(maxsize=1)  # preflight and validate both need it; reading a GGUF's config takes seconds
def _meta_model(source: ModelSource, trust_remote_code: bool) -> torch.nn.Module:
    """The model's architecture without weights (meta device): seconds even for 8B models."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _config(source, trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def check_trainer_settings(train: TrainSpec) -> None:
    """`train.optim` and `train.lr_scheduler` are names transformers' Trainer knows, and the optimizer's package is
    installed (adamw_8bit needs bitsandbytes): found here, not after the model has loaded."""
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for key, value, names in (
        ("optim", train.optim, OptimizerNames),
        ("lr_scheduler", train.lr_scheduler, SchedulerType),
    ):
        known = [name.value for name in names]
        if value not in known:
            hint = did_you_mean(value, known) or f" (known: {', '.join(known)})"
            raise RecipeError(f"train.{key}: unknown {value!r}{hint}")
    args = TrainingArguments(optim=train.optim, use_cpu=not torch.cuda.is_available(), report_to="none")
    try:
        Trainer.get_optimizer_cls_and_kwargs(args)
    except (ImportError, ValueError) as e:  # transformers raises either for a missing optimizer package
        raise EnvError(f"train.optim {train.optim} cannot be used here: {e}") from None


def warn_if_warmup_outlasts_training(recipe: Recipe) -> None:
    """A warmup as long as a run is allowed (a quick `--set train.max_steps=2` of a real recipe does it), but that
    run's learning rate never reaches train.lr, so say so."""
    runs = {"train.max_steps": recipe.train.max_steps}
    if recipe.qat.max_steps is not None:
        runs["qat.max_steps"] = recipe.qat.max_steps
    for key, steps in runs.items():
        if recipe.train.warmup_steps >= steps:
            log.warning(
                "train.warmup_steps=%d is not below %s=%d: the learning rate never reaches its peak (train.lr) in "
                "that run",
                recipe.train.warmup_steps,
                key,
                steps,
            )


def check_plan(plan: Plan) -> None:
    """A scheme that quantizes none of the model's linear layers (e.g. a group size that divides no in_features)
    would train and convert a model that is not quantized."""
    linears = [m for m in plan.modules if m.kind == "linear"]
    if linears and not any(m.quantize for m in linears):
        reasons = Counter(m.reason for m in linears)
        raise RecipeError(
            f"scheme {plan.scheme} quantizes no linear layer of this model: "
            + "; ".join(f"{count} × {reason}" for reason, count in reasons.most_common(3))
        )


def check_lora_targets(model: torch.nn.Module, target_modules: list[str]) -> None:
    """Each `lora.target_modules` entry must name linear layers of the language model, matched as peft matches
    it (a module's full name or its last dotted parts). peft itself accepts a list in which only some entries
    match, so a misspelt name would silently train fewer adapters."""
    import torch

    outside = tuple(f"{p}." for p in non_language_modules(model))
    lm_head = model.get_output_embeddings()
    modules = [(fqn, mod) for fqn, mod in model.named_modules() if fqn and not f"{fqn}.".startswith(outside)]
    adaptable = sorted(
        {fqn.rsplit(".", 1)[-1] for fqn, mod in modules if isinstance(mod, torch.nn.Linear) and mod is not lm_head}
    )
    for target in target_modules:
        hits = [mod for fqn, mod in modules if fqn == target or fqn.endswith(f".{target}")]
        if not hits:
            raise RecipeError(
                f"lora.target_modules: {target!r} matches no layer of the language model{did_you_mean(target, adaptable)}; "
                f"its linear layers are {', '.join(adaptable)}"
            )
        if any(mod is lm_head for mod in hits):
            raise RecipeError(
                f"lora.target_modules: {target!r} is the output layer, which takes no LoRA adapter: TRL's and "
                "Unsloth's fused losses read lm_head.weight directly, so an adapter there would never train"
            )
        other = sorted({type(mod).__name__ for mod in hits if not isinstance(mod, torch.nn.Linear)})
        if other:
            raise RecipeError(
                f"lora.target_modules: {target!r} names {', '.join(other)} modules, but LoRA adapters go on "
                f"linear layers: {', '.join(adaptable)}"
            )


def validate(recipe: Recipe) -> Validation:
    """Preflight, then build the model on the meta device (no weights) to list what will be quantized."""
    source = preflight(recipe)
    result = Validation(recipe, source)
    model = _meta_model(source, recipe.model.trust_remote_code)
    plan = plan_modules(model, recipe.quant)
    result.plan = plan
    for m in plan.modules:
        leaf = m.fqn.rsplit(".", 1)[-1]
        key = f"{m.kind} {leaf}"
        result.by_type.setdefault(key, Counter())["quantize" if m.quantize else m.reason] += 1
    total = unique_param_count(model)
    quantized_params = sum(m.shape[0] * m.shape[1] for m in plan.quantized)
    gs = plan.group_size
    bits = recipe.quant.scheme.weight_bits + (16 / gs if gs else 0)
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
