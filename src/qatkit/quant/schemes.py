"""The built-in schemes: each a torchao config factory and its registry entry.

torchao is imported inside the factories only: `qatkit --help` and recipe validation must not import torch.
"""

from __future__ import annotations

from qatkit.quant.registry import Scheme, register_scheme


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


def _gguf_fake_quantizer(qtype: str):
    def build(range_learning: bool = False):
        from qatkit.quant.gguf_grid import GGUFFakeQuantizeConfig, GGUFFakeQuantizer

        return GGUFFakeQuantizer(GGUFFakeQuantizeConfig(qtype, range_learning=range_learning))

    return build


def _int8_embedding():
    return _intx_weight_only(8)(None)


def _int8_act_int4_weight(group_size: int | None):
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, PerGroup

    granularity = PerGroup(group_size) if group_size else PerAxis(0)
    # bf16 scales, as the Qwen3-4B 8da4w card and ExecuTorch's XNNPACK store them
    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=granularity, weight_scale_dtype=torch.bfloat16
    )


def _int8_act_intx_weight_fake_quant(group_size: int | None):
    """Fake-quantize configs doing the converted linear's arithmetic (torchao 0.18 refuses to derive them for a
    weight_scale_dtype): torchao's for the config without it, the weight's scale_precision then set to it. Convert
    computes each scale in the weight's dtype, rounds it to bf16 and only then the integers, round(w * (1 / scale))
    with the reciprocal in bf16 too; scale_precision makes the fake quantizer do exactly that. Activations as torchao
    derives them: int8 per token, asymmetric, scales in the activation's dtype, as the converted linear quantizes
    them at run time."""
    import dataclasses

    from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs

    base = _int8_act_int4_weight(group_size)
    activation, weight = _infer_fake_quantize_configs(dataclasses.replace(base, weight_scale_dtype=None))
    weight.scale_precision = base.weight_scale_dtype
    return activation, weight


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
        weight_bits=4,
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
        weight_bits=8,
        summary="int8 weight-only, per output channel (Unsloth PR #3859)",
        configs="IntxWeightOnlyConfig(int8, PerAxis(0))",
        linear_config=_intx_weight_only(8),
        learnable_scales=True,
    )
)
register_scheme(
    Scheme(
        name="int8-int4",
        weight_bits=4,
        aliases=("8da4w", "phone-deployment"),
        summary="int8 dynamic activations + int4 symmetric weights g32, bf16 scales; int8 embeddings; lm_head untied",
        configs="Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32), weight_scale_dtype=bfloat16) "
        "+ IntxWeightOnlyConfig(int8, PerAxis(0)) on embeddings",
        linear_config=_int8_act_int4_weight,
        fake_quantize_configs=_int8_act_intx_weight_fake_quant,
        revision=2,  # 2: bf16 weight scales (were those of the weights' dtype)
        default_group_size=32,
        embedding_config=_int8_embedding,
        quantize_lm_head=True,
        learnable_scales=True,
        notes="ExecuTorch/XNNPACK layout (the Qwen3-4B 8da4w card)",
        export_formats=("executorch",),
    )
)
register_scheme(
    Scheme(
        name="w4-intx",
        weight_bits=4,
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
        weight_bits=4,
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
        weight_bits=4,
        summary="fp8 dynamic activations + int4 weights g128",
        configs="Float8DynamicActivationInt4WeightConfig()",
        linear_config=_fp8_act_int4_weight,
        default_group_size=128,
        convert_on="cuda",
        cpu_alternatives="int8-int4",
        notes="convert needs torchao's CUDA int4 kernels (mslk); torchao 0.18 cannot save the result "
        "(Int4PreshuffledTensor is not on its safetensors allow-list), so convert stops with exit 3",
        convert_packages=("mslk",),
        straight_through_fp8=True,
        fixed_granularity=True,
    )
)
register_scheme(
    Scheme(
        name="fp8-fp8",
        weight_bits=8,
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
        weight_bits=4,
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
        weight_bits=8,
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
register_scheme(
    Scheme(
        name="q4_0",
        weight_bits=4,
        summary="llama.cpp GGUF Q4_0 on the linears: int4 blocks of 32, fp16 scale; bit-exact with gguf-py",
        configs="GGUF Q4_0 fake quantizer (qatkit) -> IntxWeightOnlyConfig(int4, PerGroup(32)) with the GGUF scales",
        linear_config=_intx_weight_only(4),  # at default_group_size: the GGUF block
        default_group_size=32,
        fixed_granularity=True,
        weight_fake_quantizer=_gguf_fake_quantizer("Q4_0"),
        learnable_scales=True,  # any fp16 block scale is a valid Q4_0 block
        gguf_type="Q4_0",
        notes="embeddings and lm_head kept in high precision (export.gguf.embeddings picks their GGUF type)",
    )
)
register_scheme(
    Scheme(
        name="q8_0",
        weight_bits=8,
        summary="llama.cpp GGUF Q8_0 on the linears: int8 blocks of 32, fp16 scale; bit-exact with gguf-py",
        configs="GGUF Q8_0 fake quantizer (qatkit) -> IntxWeightOnlyConfig(int8, PerGroup(32)) with the GGUF scales",
        linear_config=_intx_weight_only(8),
        default_group_size=32,
        fixed_granularity=True,
        weight_fake_quantizer=_gguf_fake_quantizer("Q8_0"),
        learnable_scales=True,  # any fp16 block scale is a valid Q8_0 block
        gguf_type="Q8_0",
        notes="embeddings and lm_head kept in high precision (export.gguf.embeddings picks their GGUF type)",
    )
)
