"""LoRA under fake quantization.

`unmerged` (torchao/Unsloth default): y = fq(W) x + s·B A x. Deployment, however, runs q(W + s·BA) x,
so the low-rank update is never seen through the quantizer during training.
`merged`: y = fq(W + s·B A) x, so the trained forward *is* the deployed forward and QAT optimizes
exactly what convert produces. Works on any peft LoRA layer whose base layer carries torchao fake
quantizers (no torchao import needed here).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from qatkit.quant.patches import fake_quantize_weight


class _MergedLoRALinear(torch.autograd.Function):
    """y = fq(W + s·B A) x with a straight-through gradient that never forms a full-size weight gradient.

    With the straight-through estimator d fq(W')/dW' = I, so dL/dB = s·dYᵀ(X Aᵀ) and dL/dA = s·(dY B)ᵀX:
    two thin matmuls instead of the tokens × out × in weight-gradient matmul autograd would run. The
    forward is bit-identical to fq(W + s·B A) x, so train/deploy parity is untouched.
    """

    @staticmethod
    def forward(ctx, x, quantized, lora_a, lora_b, scaling, bias):
        ctx.save_for_backward(x, quantized, lora_a, lora_b)
        ctx.scaling = scaling
        return F.linear(x, quantized, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, quantized, lora_a, lora_b = ctx.saved_tensors
        # under autocast grad_out is in the autocast dtype (autograd casts grad_x back to x's dtype)
        grad_x = grad_out @ quantized.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(lora_a.dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(lora_a.dtype)
        grad_a = (g @ lora_b).T @ x2 * ctx.scaling
        grad_b = g.T @ (x2 @ lora_a.T) * ctx.scaling
        return grad_x, None, grad_a, grad_b, None, None


def _merged_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = self.get_base_layer()
    if self.disable_adapters or self.merged:
        return base(x)
    if base.activation_fake_quantizer is not None:
        x = base.activation_fake_quantizer(x)
    (name,) = [n for n in self.active_adapters if n in self.lora_A]
    lora_a, lora_b, scaling = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
    fq = base.weight_fake_quantizer
    bias = None if base.bias is None else base.bias.to(x.dtype)

    def merged():
        return base.weight + (lora_b @ lora_a) * scaling

    scale = getattr(fq, "scale", None)
    if isinstance(scale, torch.nn.Parameter) and scale.requires_grad:  # learned scales need autograd through fq
        return F.linear(x, fake_quantize_weight(fq, merged).to(x.dtype), bias)
    with torch.no_grad():
        quantized = fake_quantize_weight(fq, merged).to(x.dtype)
    return _MergedLoRALinear.apply(x, quantized, lora_a, lora_b, scaling, bias)


def use_merged_lora_forward(model: torch.nn.Module) -> int:
    """Switch every LoRA layer over a fake-quantized linear to the merged forward. Returns the count."""
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for mod in model.modules():
        if isinstance(mod, LoraLinear) and getattr(mod.get_base_layer(), "weight_fake_quantizer", None) is not None:
            mod.forward = types.MethodType(_merged_forward, mod)
            mod.get_base_layer().weight_fake_quantizer.input_changes_every_step = True  # W + s·BA: never cache
            count += 1

    return count
