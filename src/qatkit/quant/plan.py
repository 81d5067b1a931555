"""Which modules a scheme quantizes (and why not), and the model surgery that needs: untying lm_head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from qatkit.quant.spec import QuantSpec


@dataclass
class ModulePlan:
    fqn: str
    kind: Literal["linear", "embedding"]
    shape: tuple[int, int]
    quantize: bool
    reason: str = ""


@dataclass
class Plan:
    scheme: str
    group_size: int | None
    modules: list[ModulePlan] = field(default_factory=list)
    untie_embeddings: bool = False

    @property
    def quantized(self) -> list[ModulePlan]:
        return [m for m in self.modules if m.quantize]

    @property
    def skipped(self) -> list[ModulePlan]:
        return [m for m in self.modules if not m.quantize]

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme,
            "group_size": self.group_size,
            "untie_embeddings": self.untie_embeddings,
            "quantized": [m.fqn for m in self.quantized],
            "skipped": {m.fqn: m.reason for m in self.skipped},
        }


def _is_lora(fqn: str) -> bool:
    return "lora_" in fqn


OUTSIDE_LANGUAGE_MODEL = "outside the language model (text-only finetune keeps it in high precision)"


def non_language_modules(model: torch.nn.Module) -> list[str]:
    """fqns of the submodules outside the language model: vision/audio towers, projectors; [] for text-only models.

    qatkit fine-tunes on text only, so these get neither fake quantizers nor LoRA adapters and stay
    bit-identical (e.g. Gemma-3's SigLIP tower, like Unsloth's `finetune_vision_layers=False`).
    The language model is `get_decoder()` plus the output embedding (lm_head).
    """
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return []
    if decoder is None or decoder is model:
        return []
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keep = {id(decoder)} | ({id(out_emb)} if out_emb is not None else set())
    kept_fqns = [fqn for fqn, mod in model.named_modules() if id(mod) in keep]
    if not any(mod is decoder for _, mod in model.named_modules()):
        return []
    ancestors = {fqn.rsplit(".", i)[0] for fqn in kept_fqns for i in range(1, fqn.count(".") + 1)} | {""}
    outside = []

    def walk(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            fqn = f"{prefix}.{name}" if prefix else name
            if id(child) in keep:
                continue
            if fqn in ancestors:
                walk(fqn, child)
            elif any(True for _ in child.parameters()):
                outside.append(fqn)

    walk("", model)
    return outside


def lora_exclude_pattern(model: torch.nn.Module) -> str | None:
    """peft `exclude_modules` regex that keeps LoRA adapters out of `non_language_modules` (None if there are none)."""
    import re

    prefixes = non_language_modules(model)
    return rf"(?:{'|'.join(re.escape(p) for p in prefixes)})(?:\..*)?" if prefixes else None


def plan_modules(model: torch.nn.Module, spec: QuantSpec) -> Plan:
    """Decide, per Linear/Embedding, whether the scheme quantizes it and why not."""
    import torch

    gs = spec.group_size
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    plan = Plan(spec.name, gs)
    outside = tuple(f"{p}." for p in non_language_modules(model))
    for fqn, mod in model.named_modules():
        if _is_lora(fqn):
            continue
        if outside and f"{fqn}.".startswith(outside):
            if isinstance(mod, torch.nn.Linear | torch.nn.Embedding):
                kind = "linear" if isinstance(mod, torch.nn.Linear) else "embedding"
                plan.modules.append(ModulePlan(fqn, kind, tuple(mod.weight.shape), False, OUTSIDE_LANGUAGE_MODEL))
            continue
        if isinstance(mod, torch.nn.Linear):
            p = ModulePlan(fqn, "linear", (mod.out_features, mod.in_features), True)
            if mod is out_emb and not spec.quantize_lm_head:
                p.quantize, p.reason = False, "lm_head (not covered by this scheme)"
            elif gs and mod.in_features % gs:
                p.quantize, p.reason = False, f"in_features {mod.in_features} not a multiple of group size {gs}"
            plan.modules.append(p)
        elif isinstance(mod, torch.nn.Embedding):
            p = ModulePlan(fqn, "embedding", (mod.num_embeddings, mod.embedding_dim), spec.quantizes_embeddings)
            if not p.quantize:
                p.reason = "embedding (not covered by this scheme)"
            elif type(mod) is not torch.nn.Embedding:
                p.quantize, p.reason = False, f"{type(mod).__name__} has extra forward logic; kept in high precision"
            plan.modules.append(p)
    # a tied pair can no longer share one tensor once either side is quantized
    quantized = {m.fqn for m in plan.quantized}
    plan.untie_embeddings = tied and any(
        fqn in quantized for fqn, mod in model.named_modules() if mod in (out_emb, in_emb)
    )
    return plan


def untie_embeddings(model: torch.nn.Module) -> None:
    """Give lm_head its own weight so it can be quantized differently from the embedding."""
    import torch

    out_emb = model.get_output_embeddings()
    out_emb.weight = torch.nn.Parameter(out_emb.weight.detach().clone(), requires_grad=out_emb.weight.requires_grad)
    model.config.get_text_config(decoder=True).tie_word_embeddings = False
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False
    model._tied_weights_keys = {} if isinstance(getattr(model, "_tied_weights_keys", None), dict) else []


def stable_fqn(fqn: str) -> str:
    """A module's name without peft's wrapping, so plain and LoRA-wrapped models name it alike."""
    return fqn.removeprefix("base_model.model.").removesuffix(".base_layer")
