"""Apply a QuantSpec to a model: prepare (fake quantizers), convert (real torchao tensors), PTQ, and the
transformers hook that makes the converted model save as a checkpoint plain `from_pretrained` loads."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from qatkit.core.errors import EnvError, RecipeError
from qatkit.quant.hardware import require_hardware
from qatkit.quant.patches import use_straight_through_fp8
from qatkit.quant.plan import Plan, plan_modules, untie_embeddings
from qatkit.quant.scales import init_learned_scales, round_learned_scales

if TYPE_CHECKING:
    import torch

    from qatkit.quant.spec import QuantSpec

log = logging.getLogger(__name__)


def _fqn_filter(fqns: set[str]):
    return lambda mod, fqn: fqn in fqns


def prepare(model: torch.nn.Module, spec: QuantSpec) -> Plan:
    """Insert fake quantizers (QATConfig step="prepare", or the scheme's own weight fake quantizer on torchao's
    FakeQuantizedLinear) into the modules the plan covers."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    from qatkit.quant.fused import use_fused_token_fake_quant

    plan = plan_modules(model, spec)
    if plan.untie_embeddings:
        untie_embeddings(model)
    for skipped in plan.skipped:
        if skipped.kind == "linear" and "group size" in skipped.reason:
            log.warning("not quantizing %s: %s", skipped.fqn, skipped.reason)
    linears = {m.fqn for m in plan.quantized if m.kind == "linear"}
    embeddings = {m.fqn for m in plan.quantized if m.kind == "embedding"}
    if linears and spec.scheme.weight_fake_quantizer is not None:
        build = functools.partial(spec.scheme.weight_fake_quantizer, range_learning=spec.learn_scales)
        _prepare_own_weight_fake_quant(model, linears, build)
    elif linears:
        quantize_(model, spec.linear_prepare_config(), _fqn_filter(linears))
        use_fused_token_fake_quant(model)
    if embeddings:
        quantize_(model, QATConfig(spec.embedding_config(), step="prepare"), _fqn_filter(embeddings))
    if spec.scheme.straight_through_fp8:
        use_straight_through_fp8(model)
    if spec.learn_scales:
        init_learned_scales(model, mse=spec.scale_init == "mse")
    return plan


def _prepare_own_weight_fake_quant(model: torch.nn.Module, fqns: set[str], build) -> None:
    """torchao's FakeQuantizedLinear (so LoRA, merge, inspection and convert see the usual module) carrying the
    scheme's own weight fake quantizer, and no activation fake quantizer."""
    from torchao.quantization.qat import FakeQuantizedLinear

    for fqn in sorted(fqns):
        linear = FakeQuantizedLinear.from_linear(model.get_submodule(fqn))
        linear.weight_fake_quantizer = build()
        model.set_submodule(fqn, linear)


def _convert_own_weight_fake_quant(model: torch.nn.Module, fqns: set[str], cfg, scheme: str) -> None:
    """Each linear's weight as torchao's IntxUnpackedToInt8Tensor holding exactly its fake quantizer's integers and
    scales (zero point 0), so the converted forward is the fake-quantized one and plain `from_pretrained` loads it."""
    import torch
    from torchao.quantization import IntxUnpackedToInt8Tensor, PerGroup

    if not isinstance(cfg.granularity, PerGroup):
        raise TypeError(f"scheme {scheme}: its own fake quantizer converts to PerGroup intx weights, got {cfg}")
    for fqn in sorted(fqns):
        module = model.get_submodule(fqn)
        fq = module.weight_fake_quantizer
        if not callable(getattr(fq, "quantize", None)):
            raise RecipeError(
                f"convert with scheme {scheme}: {fqn} was prepared with {type(fq).__name__}, not the scheme's own "
                "fake quantizer; convert with the scheme the model was trained with"
            )
        qdata, scale = fq.quantize(module.weight)
        weight = IntxUnpackedToInt8Tensor(
            qdata=qdata,
            scale=scale,
            zero_point=torch.zeros_like(scale, dtype=torch.int8),
            target_dtype=cfg.weight_dtype,
            block_size=(1, cfg.granularity.group_size),
            dtype=module.weight.dtype,
            activation_quantization=None,
        )
        linear = module.to_linear()
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        model.set_submodule(fqn, linear)


def convert(model: torch.nn.Module, spec: QuantSpec) -> dict[str, object]:
    """Turn fake-quantized modules into real torchao tensors (QATConfig step="convert"; for a scheme with its own
    weight fake quantizer, intx tensors of exactly that quantizer's integers and scales).

    Returns the fqn -> torchao config map of what was converted (needed to save the checkpoint).
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear, QATConfig

    require_hardware(spec.scheme, "convert")
    round_learned_scales(model)
    converted: dict[str, object] = {}
    for cls, build in ((FakeQuantizedLinear, spec.linear_config), (FakeQuantizedEmbedding, spec.embedding_config)):
        fqns = {n for n, m in model.named_modules() if isinstance(m, cls)}
        if fqns:
            cfg = build()
            if cls is FakeQuantizedLinear and spec.scheme.weight_fake_quantizer is not None:
                _convert_own_weight_fake_quant(model, fqns, cfg, spec.name)
            else:
                quantize_(model, QATConfig(cfg, step="convert"), _fqn_filter(fqns))
            converted.update(dict.fromkeys(sorted(fqns), cfg))
    if not converted:
        raise RecipeError("convert found no fake-quantized modules: the model was not prepared for QAT")
    return converted


def quantize_ptq(model: torch.nn.Module, spec: QuantSpec) -> dict[str, object]:
    """Post-training quantization through the exact same path as QAT convert (scales from the weights)."""
    spec = spec.for_ptq()
    prepare(model, spec)
    return convert(model, spec)


def attach_hf_quantizer(model: torch.nn.Module, converted: dict[str, object]) -> None:
    """Make `save_pretrained` write a checkpoint that plain `from_pretrained` loads (torchao format)."""
    from torchao.prototype.safetensors.safetensors_utils import ALLOWED_TENSORS_SUBCLASSES
    from torchao.quantization import FqnToConfig
    from transformers import TorchAoConfig
    from transformers.quantizers import AutoHfQuantizer

    unsaveable = {
        type(p).__name__
        for p in model.parameters()
        if type(p).__module__.startswith("torchao") and type(p).__name__ not in ALLOWED_TENSORS_SUBCLASSES
    }
    if unsaveable:  # transformers would fail half-way through save_pretrained with "Unsupported tensor type"
        raise EnvError(
            f"this torchao cannot save {', '.join(sorted(unsaveable))} in a checkpoint (not on its safetensors "
            "allow-list, and transformers saves only safetensors); convert with another scheme"
        )
    has_embedding = any(type(c).__name__ == "IntxWeightOnlyConfig" and "embed" in f for f, c in converted.items())
    cfg = TorchAoConfig(
        FqnToConfig(dict(converted)), modules_to_not_convert=[], include_input_output_embeddings=has_embedding
    )
    model.hf_quantizer = AutoHfQuantizer.from_config(cfg, pre_quantized=True)
    model.config.quantization_config = model.hf_quantizer.quantization_config
