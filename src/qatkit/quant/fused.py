"""torchao's fake quantize ops as single autograd Functions: the same forward bit for bit and the gradients autograd
derives from torchao's ops, in the same dtypes, each direction a few in-place passes where autograd allocates a
tensor per op and keeps float copies for the backward. On CPU this elementwise work, not the matmuls, was most of
a merged-LoRA QAT step's fake-quantization cost (benchmarks/general-step).

Imported only inside functions, so torch and torchao at module level here never reach `qatkit --help`.
"""

from __future__ import annotations

import types

import torch
from torchao.quantization.granularity import PerToken
from torchao.quantization.qat import IntxFakeQuantizer
from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, MappingType, choose_qparams_affine


class GroupFakeQuantize(torch.autograd.Function):
    """torchao's `_fake_quantize_per_channel_group(w, scale, zero_point, qmin, qmax, group_size)` (integer zero
    point, 2-D weight) bit for bit, with the gradients autograd derives from torchao's ops, in the same dtypes: for
    `w` the straight-through one inside the clamp range, for `scale` through the dequantizing multiply and the
    quantizing reciprocal. Each direction is a few in-place passes over the weight where autograd allocates a
    tensor per op and keeps two float copies for the backward: on CPU this elementwise work, not the matmuls, was
    a third of a learned-scale merged-LoRA step."""

    @staticmethod
    def forward(ctx, w, scale, zero_point, qmin: int, qmax: int, group_size: int):
        groups = w.reshape(w.shape[0], -1, group_size)
        s = scale.reshape(*groups.shape[:2], 1)
        zp = zero_point.reshape(s.shape)
        inverse = 1.0 / s  # torchao's w * (1.0 / scale): the reciprocal in the scale's dtype
        q = (groups * inverse).round_().add_(zp)
        inside = (q >= qmin).logical_and_(q <= qmax)  # where the clamp passes the gradient
        centered = q.clamp_(qmin, qmax).sub_(zp.to(q.dtype))
        ctx.save_for_backward(groups, centered, inside, s, inverse)
        ctx.scale_shape = scale.shape
        return (centered * s).view(w.shape)

    @staticmethod
    def backward(ctx, grad):
        groups, centered, inside, s, inverse = ctx.saved_tensors
        grad = grad.reshape(centered.shape)
        grad_scale = (grad * centered).sum(-1, keepdim=True).to(s.dtype)
        grad_q = (grad * s).masked_fill_(~inside, 0)
        grad_inverse = (grad_q * groups).sum(-1, keepdim=True).to(inverse.dtype)
        grad_scale += -grad_inverse * (inverse * inverse)  # autograd's reciprocal backward, in the scale's dtype
        grad_w = grad_q.mul_(inverse)
        return grad_w.view(groups.shape[0], -1), grad_scale.view(ctx.scale_shape), None, None, None, None


class TokenFakeQuantize(torch.autograd.Function):
    """torchao's `_fake_quantize_per_token(x, scale, zero_point, qmin, qmax)` (the dynamic per-token activation fake
    quantization of int8-int4 and friends), with torchao's straight-through gradient for `x` (the scale and zero
    point come from choose_qparams, without a gradient): the dequantize, and its gradient, in x's dtype as torchao
    computes them."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):
        s = scale.reshape(*x.shape[:-1], 1)
        zp = zero_point.reshape(s.shape)
        inverse = 1.0 / s
        q = (x * inverse).round_().add_(zp)
        inside = (q >= qmin).logical_and_(q <= qmax)  # where the clamp passes the gradient
        centered = q.clamp_(qmin, qmax).to(x.dtype).sub_(zp.to(x.dtype))  # torchao dequantizes in x's dtype
        ctx.save_for_backward(inside, s, inverse)
        return (centered * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        inside, s, inverse = ctx.saved_tensors
        dtype = grad.dtype
        grad_centered = (grad.to(torch.promote_types(dtype, s.dtype)) * s).to(dtype).masked_fill_(~inside, 0)
        return (grad_centered * inverse).to(dtype), None, None, None, None


class LastCall:
    """The last input of a group of activation fake quantizers with one config, and what they made of it:
    q_proj, k_proj and v_proj read the same tensor, and so do gate_proj and up_proj."""

    def __init__(self):
        self.input = self.version = self.grad_enabled = self.result = None

    def matches(self, x: torch.Tensor) -> bool:
        return self.input is x and self.version == x._version and self.grad_enabled == torch.is_grad_enabled()

    def remember(self, x: torch.Tensor, result: tuple) -> None:
        self.input, self.version, self.grad_enabled, self.result = x, x._version, torch.is_grad_enabled(), result


def _fake_quantize_tokens(config, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x fake-quantized per token as torchao's IntxFakeQuantizer does it, and the scale and zero point it chose."""
    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[config.dtype]
    scale, zero_point = choose_qparams_affine(
        x,
        mapping_type=MappingType.ASYMMETRIC,
        block_size=[*([1] * (x.dim() - 1)), x.shape[-1]],
        target_dtype=config.dtype,
        quant_min=qmin,
        quant_max=qmax,
        eps=config.eps,
        scale_dtype=config.scale_precision,
        zero_point_dtype=config.zero_point_precision,
    )
    return TokenFakeQuantize.apply(x, scale, zero_point, qmin, qmax), scale, zero_point


def _per_token_forward(self, x: torch.Tensor) -> torch.Tensor:
    """IntxFakeQuantizer._per_token_forward (dynamic, asymmetric, no range learning) through TokenFakeQuantize,
    computed once for an input that the group's previous quantizer just fake-quantized (the same output tensor,
    so its backward runs once too)."""
    last = self._qatkit_last_call
    if x.is_inference():  # no version counter to tell an in-place change by: not shared
        result = _fake_quantize_tokens(self.config, x)
    elif last.matches(x):
        result = last.result
    else:
        result = _fake_quantize_tokens(self.config, x)
        last.remember(x, result)
    output, self.scale, self.zero_point = result
    return output


def use_fused_token_fake_quant(model: torch.nn.Module) -> int:
    """Every dynamic per-token activation fake quantizer of torchao in `model` computes through TokenFakeQuantize,
    and those with one config share the result for one input: the same outputs; the input's gradient is the
    straight-through one of the summed output gradients instead of the sum of each one's (equal but for rounding).
    Returns the count."""
    last_calls: dict[str, LastCall] = {}
    count = 0
    for mod in model.modules():
        fq = getattr(mod, "activation_fake_quantizer", None)
        config = getattr(fq, "config", None)
        if (
            type(fq) is IntxFakeQuantizer
            and isinstance(config.granularity, PerToken)
            and config.is_dynamic
            and not config.is_symmetric
            and not config.range_learning
        ):
            fq._qatkit_last_call = last_calls.setdefault(repr(config), LastCall())
            fq._per_token_forward = types.MethodType(_per_token_forward, fq)
            count += 1
    return count
