"""Scheme registry: the only module that imports torchao.

A scheme is one object that yields both the QAT (fake-quant) step and the convert step from the same
torchao base config, so the quantizer used in training is by construction the one used at deployment.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from qatkit.errors import EnvError, RecipeError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Hardware = Literal["cpu", "cuda", "cuda-sm89", "cuda-sm100"]
HARDWARE_TEXT = {
    "cpu": "CPU or GPU",
    "cuda": "a CUDA GPU",
    "cuda-sm89": "a CUDA GPU with compute capability >= 8.9 (Ada/Hopper)",
    "cuda-sm100": "a Blackwell GPU (compute capability >= 10.0)",
}


@dataclass(frozen=True)
class Scheme:
    name: str
    summary: str
    configs: str  # human-readable torchao configs, for `qatkit schemes`
    linear_config: Callable[[int | None], object]  # group_size -> torchao base config for linears
    default_group_size: int | None = None
    embedding_config: Callable[[], object] | None = None  # quantize input embeddings too
    quantize_lm_head: bool = False  # also quantize lm_head (untied first if tied)
    train_on: Hardware = "cpu"
    convert_on: Hardware = "cpu"
    aliases: tuple[str, ...] = ()
    cpu_alternatives: str = ""
    notes: str = ""
    convert_packages: tuple[str, ...] = ()  # imported by torchao when converting (its CUDA kernels)
    straight_through_fp8: bool = False  # torchao casts fp8 fake-quant grads unscaled; use STE
    fixed_granularity: bool = False  # the torchao config sets its own groups/rows: qat.group_size cannot change them
    learnable_scales: bool = False  # intx weights: torchao range learning and convert with custom scales work
    learn_scales: bool = False  # train the linears' weight scales (the recipe's qat.learn_scales)
    scale_init: Literal["absmax", "mse"] = "absmax"  # where learned scales start (the recipe's qat.scale_init)

    def group_size(self, override: int | None = None) -> int | None:
        return override if override is not None else self.default_group_size


_SCHEMES: dict[str, Scheme] = {}
_ALIASES: dict[str, str] = {}


def register_scheme(s: Scheme) -> Scheme:
    for key in (s.name, *s.aliases):
        if key in _SCHEMES or key in _ALIASES:
            raise ValueError(f"scheme {key!r} registered twice")
    _SCHEMES[s.name] = s
    _ALIASES.update({a: s.name for a in s.aliases})
    return s


def list_schemes() -> list[Scheme]:
    return list(_SCHEMES.values())


def canonical_name(name: str) -> str:
    name = name.strip().lower()
    if name in _SCHEMES:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    known = sorted([*_SCHEMES, *_ALIASES])
    close = difflib.get_close_matches(name, known, n=2)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown scheme {name!r}.{hint} Known: {', '.join(sorted(_SCHEMES))}")


def get_scheme(name: str) -> Scheme:
    try:
        return _SCHEMES[canonical_name(name)]
    except ValueError as e:
        raise RecipeError(str(e)) from None


def for_recipe(qat) -> Scheme:
    """The recipe's `qat` section as a scheme: the named one with the recipe's module overrides applied."""
    scheme = get_scheme(qat.scheme)
    if qat.quantize_lm_head is not None:
        scheme = dataclasses.replace(scheme, quantize_lm_head=qat.quantize_lm_head)
    if qat.learn_scales:
        scheme = dataclasses.replace(scheme, learn_scales=True, scale_init=qat.scale_init or "absmax")
    return scheme


def quantization_id(qat) -> str:
    """What determines the PTQ weights of a recipe: the scheme name plus any overrides (learned scales need QAT)."""
    overrides = {"group_size": qat.group_size, "quantize_lm_head": qat.quantize_lm_head}
    return " ".join([qat.scheme, *(f"{k}={v}" for k, v in overrides.items() if v is not None)])


# --- torchao configs (imported lazily: `qatkit --help` must not import torch) -------------------


def _int4_weight_only(group_size: int | None):
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=group_size)


def _intx_weight_only(bits: int):
    def build(group_size: int | None):
        import torch
        from torchao.quantization import IntxWeightOnlyConfig, PerAxis, PerGroup

        dtype = {4: torch.int4, 8: torch.int8}[bits]
        granularity = PerGroup(group_size) if group_size else PerAxis(0)
        return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)

    return build


def _int8_embedding():
    return _intx_weight_only(8)(None)


def _int8_act_int4_weight(group_size: int | None):
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, PerGroup

    granularity = PerGroup(group_size) if group_size else PerAxis(0)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=granularity)


def _fp8_act_int4_weight(group_size: int | None):
    from torchao.quantization import Float8DynamicActivationInt4WeightConfig

    return Float8DynamicActivationInt4WeightConfig()


def _fp8_fp8(group_size: int | None):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def _nvfp4(group_size: int | None):
    from torchao.prototype.mx_formats import NVFP4DynamicActivationNVFP4WeightConfig

    return NVFP4DynamicActivationNVFP4WeightConfig()


def _mxfp8(group_size: int | None):
    from torchao.prototype.mx_formats import MXDynamicActivationMXWeightConfig

    return MXDynamicActivationMXWeightConfig()


register_scheme(
    Scheme(
        name="int4",
        summary="int4 weight-only, asymmetric, group 128 (the Qwen3-8B / Gemma-3-12B QAT cards)",
        configs="Int4WeightOnlyConfig(group_size=128)",
        linear_config=_int4_weight_only,
        default_group_size=128,
        convert_on="cuda",
        cpu_alternatives="w4-intx or int8-int4",
        notes="convert needs torchao's CUDA int4 kernels (mslk)",
        convert_packages=("mslk",),
    )
)
register_scheme(
    Scheme(
        name="int8",
        summary="int8 weight-only, per output channel (Unsloth PR #3859)",
        configs="IntxWeightOnlyConfig(int8, PerAxis(0))",
        linear_config=_intx_weight_only(8),
        learnable_scales=True,
    )
)
register_scheme(
    Scheme(
        name="int8-int4",
        aliases=("8da4w", "phone-deployment"),
        summary="int8 dynamic activations + int4 symmetric weights g32; int8 embeddings; lm_head untied",
        configs="Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32)) + IntxWeightOnlyConfig(int8, PerAxis(0)) on embeddings",
        linear_config=_int8_act_int4_weight,
        default_group_size=32,
        embedding_config=_int8_embedding,
        quantize_lm_head=True,
        learnable_scales=True,
        notes="ExecuTorch/XNNPACK layout (the Qwen3-4B 8da4w card)",
    )
)
register_scheme(
    Scheme(
        name="w4-intx",
        summary="int4 weight-only, symmetric, group 32 (converts on CPU)",
        configs="IntxWeightOnlyConfig(int4, PerGroup(32))",
        linear_config=_intx_weight_only(4),
        default_group_size=32,
        learnable_scales=True,
    )
)
register_scheme(
    Scheme(
        name="w4-channel",
        summary="int4 weight-only, symmetric, per output channel (where plain PTQ hurts most)",
        configs="IntxWeightOnlyConfig(int4, PerAxis(0))",
        linear_config=_intx_weight_only(4),
        default_group_size=None,
        learnable_scales=True,
    )
)
register_scheme(
    Scheme(
        name="fp8-int4",
        summary="fp8 dynamic activations + int4 weights g128",
        configs="Float8DynamicActivationInt4WeightConfig()",
        linear_config=_fp8_act_int4_weight,
        default_group_size=128,
        convert_on="cuda",
        cpu_alternatives="int8-int4",
        notes="convert needs torchao's CUDA int4 kernels (mslk)",
        convert_packages=("mslk",),
        straight_through_fp8=True,
        fixed_granularity=True,
    )
)
register_scheme(
    Scheme(
        name="fp8-fp8",
        summary="fp8 dynamic activations + fp8 weights, per row",
        configs="Float8DynamicActivationFloat8WeightConfig(PerRow())",
        linear_config=_fp8_fp8,
        convert_on="cuda-sm89",
        cpu_alternatives="int8",
        straight_through_fp8=True,
        fixed_granularity=True,
    )
)
register_scheme(
    Scheme(
        name="nvfp4",
        summary="NVFP4 activations and weights",
        configs="NVFP4DynamicActivationNVFP4WeightConfig()",
        linear_config=_nvfp4,
        default_group_size=16,
        train_on="cuda-sm100",
        convert_on="cuda-sm100",
        notes="Blackwell only",
        fixed_granularity=True,
    )
)
register_scheme(
    Scheme(
        name="mxfp8",
        summary="MXFP8 activations and weights",
        configs="MXDynamicActivationMXWeightConfig()",
        linear_config=_mxfp8,
        default_group_size=32,
        train_on="cuda-sm100",
        convert_on="cuda-sm100",
        notes="Blackwell only",
        fixed_granularity=True,
    )
)


# --- hardware -----------------------------------------------------------------------------------


def hardware_ok(req: Hardware) -> bool:
    if req == "cpu":
        return True
    import torch

    if not torch.cuda.is_available():
        return False
    cc = torch.cuda.get_device_capability()
    return {"cuda": (0, 0), "cuda-sm89": (8, 9), "cuda-sm100": (10, 0)}[req] <= cc


INSTALL_HINT = {"mslk": "pip install mslk-cuda, the release made for your torch (1.1.0 for torch 2.11)"}


def missing_packages(scheme: Scheme) -> list[str]:
    """The packages the scheme's convert needs besides torchao that are not installed here."""
    return [p for p in scheme.convert_packages if importlib.util.find_spec(p) is None]


def can_convert_here(scheme: Scheme) -> bool:
    return hardware_ok(scheme.convert_on) and not missing_packages(scheme)


def require_hardware(scheme: Scheme, step: Literal["train", "convert"]) -> None:
    """Refuse a step this machine cannot run: missing hardware, or (convert) a missing kernel package."""
    req = scheme.train_on if step == "train" else scheme.convert_on
    if hardware_ok(req):
        if step == "convert" and (missing := missing_packages(scheme)):
            hints = "; ".join(INSTALL_HINT.get(p, f"pip install {p}") for p in missing)
            raise EnvError(f"{scheme.name} convert needs {', '.join(missing)}, which is not installed: {hints}")
        return
    alt = f"; on CPU use {scheme.cpu_alternatives}" if scheme.cpu_alternatives else ""
    why = f" ({scheme.notes})" if scheme.notes else ""
    raise EnvError(f"{scheme.name} {step} needs {HARDWARE_TEXT[req]}{why}{alt}")


# --- which modules a scheme covers --------------------------------------------------------------


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


def plan_modules(model: torch.nn.Module, scheme: Scheme, group_size: int | None = None) -> Plan:
    """Decide, per Linear/Embedding, whether the scheme quantizes it and why not."""
    import torch

    gs = scheme.group_size(group_size)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    plan = Plan(scheme.name, gs)
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
            if mod is out_emb and not scheme.quantize_lm_head:
                p.quantize, p.reason = False, "lm_head (not covered by this scheme)"
            elif gs and mod.in_features % gs:
                p.quantize, p.reason = False, f"in_features {mod.in_features} not a multiple of group size {gs}"
            plan.modules.append(p)
        elif isinstance(mod, torch.nn.Embedding):
            p = ModulePlan(
                fqn, "embedding", (mod.num_embeddings, mod.embedding_dim), scheme.embedding_config is not None
            )
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


# --- prepare / convert ---------------------------------------------------------------------------


def _fqn_filter(fqns: set[str]):
    return lambda mod, fqn: fqn in fqns


def prepare(model: torch.nn.Module, scheme: Scheme, group_size: int | None = None) -> Plan:
    """Insert fake quantizers (QATConfig step="prepare") into the modules the plan covers."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    plan = plan_modules(model, scheme, group_size)
    if plan.untie_embeddings:
        untie_embeddings(model)
    for skipped in plan.skipped:
        if skipped.kind == "linear" and "group size" in skipped.reason:
            log.warning("not quantizing %s: %s", skipped.fqn, skipped.reason)
    linears = {m.fqn for m in plan.quantized if m.kind == "linear"}
    embeddings = {m.fqn for m in plan.quantized if m.kind == "embedding"}
    if linears:
        quantize_(model, _linear_qat_config(scheme, plan.group_size), _fqn_filter(linears))
    if embeddings:
        quantize_(model, QATConfig(scheme.embedding_config(), step="prepare"), _fqn_filter(embeddings))
    if scheme.straight_through_fp8:
        _use_straight_through_fp8(model)
    if scheme.learn_scales:
        _init_learned_scales(model, mse=scheme.scale_init == "mse")
    return plan


def _linear_qat_config(scheme: Scheme, group_size: int | None):
    """QATConfig(prepare) for the linears; with learned scales, the base config's fake-quantize configs with the
    weight scales static (computed once from the weights) and trainable (torchao range learning)."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs

    base = scheme.linear_config(group_size)
    if not scheme.learn_scales:
        return QATConfig(base, step="prepare")
    activation, weight = _infer_fake_quantize_configs(base)
    if not isinstance(weight, IntxFakeQuantizeConfig):
        raise RecipeError(f"qat.learn_scales: scheme {scheme.name} does not fake-quantize weights with intx scales")
    weight = copy.copy(weight)
    weight.is_dynamic, weight.range_learning = False, True
    return QATConfig(activation_config=activation, weight_config=weight, step="prepare")


MSE_CLIP_RATIOS = tuple(round(0.5 + 0.02 * i, 2) for i in range(26))  # scale / absmax scale, 0.5 .. 1.0


def _init_learned_scales(model: torch.nn.Module, mse: bool = False) -> None:
    """Compute each learnable weight scale from its weight now (torchao's initialize_fake_quantizers does this with a
    forward pass; the weight is all a weight scale needs): absmax, or with `mse` the clipped scale that minimises
    each group's squared rounding + clipping error (searched over MSE_CLIP_RATIOS, like GPTQ/AWQ clip search)."""
    import torch

    with torch.no_grad():
        for mod in model.modules():
            fq = getattr(mod, "weight_fake_quantizer", None)
            if getattr(getattr(fq, "config", None), "range_learning", False) and fq.scale is None:
                fq._initialized = True
                fq(mod.weight)
                if mse:
                    _clip_search(fq, mod.weight)


def _clip_search(fq, weight: torch.Tensor) -> None:
    """Per group, keep the scale (a ratio of the absmax one) whose fake-quantized weight is closest to `weight`."""
    import torch

    absmax_scale = fq.scale.detach().clone()
    groups = absmax_scale.shape  # (out features, groups per row)

    def group_error() -> torch.Tensor:
        return (fq(weight) - weight).pow(2).reshape(*groups, -1).sum(-1)

    best_scale, best_err = absmax_scale.clone(), group_error()
    for ratio in MSE_CLIP_RATIOS[:-1]:
        fq.scale.copy_(absmax_scale * ratio)
        err = group_error()
        better = err < best_err
        best_scale = torch.where(better, fq.scale, best_scale)
        best_err = torch.where(better, err, best_err)
    fq.scale.copy_(best_scale)


def stable_fqn(fqn: str) -> str:
    """A module's name without peft's wrapping, so plain and LoRA-wrapped models name it alike."""
    return fqn.removeprefix("base_model.model.").removesuffix(".base_layer")


def learned_scales(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Module fqn -> its trainable weight scale (empty unless the scheme learns scales)."""
    import torch

    return {
        stable_fqn(fqn): mod.weight_fake_quantizer.scale
        for fqn, mod in model.named_modules()
        if isinstance(getattr(getattr(mod, "weight_fake_quantizer", None), "scale", None), torch.nn.Parameter)
    }


def save_learned_scales(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({fqn: p.detach().contiguous() for fqn, p in learned_scales(model).items()}, str(path))


def load_learned_scales(model: torch.nn.Module, path: Path) -> None:
    """Put trained scales back into a model prepared with the same scheme (refuses a partial match)."""
    import torch
    from safetensors.torch import load_file

    if not path.is_file():
        raise RecipeError(f"{path} is missing: the run was trained with qat.learn_scales, its scales are needed")
    saved, scales = load_file(str(path)), learned_scales(model)
    if saved.keys() != scales.keys():
        raise RecipeError(
            f"{path} holds scales for other modules than this model learns ({len(saved)} vs {len(scales)})"
        )
    with torch.no_grad():
        for fqn, p in scales.items():
            p.copy_(saved[fqn])


def convert(model: torch.nn.Module, scheme: Scheme, group_size: int | None = None) -> dict[str, object]:
    """Turn fake-quantized modules into real torchao tensors (QATConfig step="convert").

    Returns the fqn -> torchao config map of what was converted (needed to save the checkpoint).
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear, QATConfig

    require_hardware(scheme, "convert")
    gs = scheme.group_size(group_size)
    converted: dict[str, object] = {}
    for cls, build in (
        (FakeQuantizedLinear, lambda: scheme.linear_config(gs)),
        (FakeQuantizedEmbedding, scheme.embedding_config),
    ):
        fqns = {n for n, m in model.named_modules() if isinstance(m, cls)}
        if fqns:
            cfg = build()
            quantize_(model, QATConfig(cfg, step="convert"), _fqn_filter(fqns))
            converted.update(dict.fromkeys(sorted(fqns), cfg))
    if not converted:
        raise RecipeError("convert found no fake-quantized modules: the model was not prepared for QAT")
    return converted


def quantize_ptq(model: torch.nn.Module, scheme: Scheme, group_size: int | None = None) -> dict[str, object]:
    """Post-training quantization through the exact same path as QAT convert (scales from the weights)."""
    scheme = dataclasses.replace(scheme, learn_scales=False)
    prepare(model, scheme, group_size)
    return convert(model, scheme, group_size)


def attach_hf_quantizer(model: torch.nn.Module, converted: dict[str, object]) -> None:
    """Make `save_pretrained` write a checkpoint that plain `from_pretrained` loads (torchao format)."""
    from torchao.quantization import FqnToConfig
    from transformers import TorchAoConfig
    from transformers.quantizers import AutoHfQuantizer

    has_embedding = any(type(c).__name__ == "IntxWeightOnlyConfig" and "embed" in f for f, c in converted.items())
    cfg = TorchAoConfig(
        FqnToConfig(dict(converted)), modules_to_not_convert=[], include_input_output_embeddings=has_embedding
    )
    model.hf_quantizer = AutoHfQuantizer.from_config(cfg, pre_quantized=True)
    model.config.quantization_config = model.hf_quantizer.quantization_config


# --- inspection (used by tests and the Unsloth backend's "did QAT really happen" check) -----------


def fake_quantizers(model: torch.nn.Module) -> dict[str, tuple[str | None, str | None]]:
    """fqn -> (activation fake-quantizer class, weight fake-quantizer class) for every prepared module."""
    out = {}
    for fqn, mod in model.named_modules():
        wfq = getattr(mod, "weight_fake_quantizer", None)
        if wfq is None:
            continue
        afq = getattr(mod, "activation_fake_quantizer", None)
        out[fqn] = (type(afq).__name__ if afq is not None else None, type(wfq).__name__)
    return out


def cache_frozen_weight_fake_quant(model: torch.nn.Module) -> int:
    """Compute fq(W) once for frozen weights instead of every step (same values, so parity is unchanged).

    With LoRA the base weights never change, so their fake-quantized copy is a constant. Any change of
    the weight's values (e.g. a LoRA merge) invalidates it; a weight that requires grad (full finetuning),
    the merged-LoRA input W + s·BA, or a weight with a learned scale is never cached. Costs two extra copies
    of each cached weight.
    Returns the number of fake quantizers wrapped.
    """
    import torch

    count = 0

    for mod in model.modules():
        fq = getattr(mod, "weight_fake_quantizer", None)
        if (
            fq is None
            or getattr(fq, "_qatkit_cache", None) is not None
            or getattr(fq, "input_changes_every_step", False)
            or getattr(fq.config, "range_learning", False)
        ):
            continue

        fq._qatkit_cache = {}
        original = fq.forward

        def forward(w, _orig=original, _cache=fq._qatkit_cache):
            if w.requires_grad:
                return _orig(w)
            # a private copy of the source: `.data` updates (peft's merge) bypass the version counter, so
            # only comparing values is safe; one comparison costs far less than the fake quant it replaces
            source = _cache.get("source")
            if source is None or source.shape != w.shape or source.dtype != w.dtype or not torch.equal(source, w):
                _cache["source"], _cache["value"] = w.detach().clone(), _orig(w).detach()
            return _cache["value"]

        fq.forward = forward
        count += 1
    return count


def signature(model: torch.nn.Module) -> dict[str, str]:
    """fqn -> the exact fake-quantize configs in the forward; used to prove convert rebuilt what was trained."""
    out = {}
    for fqn, mod in model.named_modules():
        wfq = getattr(mod, "weight_fake_quantizer", None)
        if wfq is not None:
            afq = getattr(mod, "activation_fake_quantizer", None)
            act = repr(getattr(afq, "config", None)) if afq is not None else "None"
            out[stable_fqn(fqn)] = f"act={act} weight={getattr(wfq, 'config', None)!r}"
    return out


def _use_straight_through_fp8(model: torch.nn.Module) -> None:
    """Wrap fp8 fake quantizers in a straight-through estimator.

    torchao 0.18 casts the gradient of its fp8 fake quant to fp8 without a scale, which zeroes almost
    all of it; the STE passes the gradient through unchanged while the forward stays bit-identical.
    """
    import torch

    class _STE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, fq):
            with torch.no_grad():
                return fq(x)

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    for mod in model.modules():
        for attr in ("activation_fake_quantizer", "weight_fake_quantizer"):
            fq = getattr(mod, attr, None)
            if fq is not None and "Float8" in type(fq).__name__ and not getattr(fq, "_qatkit_ste", False):
                original = fq.forward
                fq.forward = lambda x, _orig=original: _STE.apply(x, _orig)
                fq._qatkit_ste = True
