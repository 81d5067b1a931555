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


def _merged_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = self.get_base_layer()
    if self.disable_adapters or self.merged:
        return base(x)
    weight = base.weight
    for name in self.active_adapters:
        if name in self.lora_A:
            weight = weight + self.get_delta_weight(name)
    if base.activation_fake_quantizer is not None:
        x = base.activation_fake_quantizer(x)
    weight = base.weight_fake_quantizer(weight)
    return F.linear(x, weight.to(x.dtype), base.bias)


def use_merged_lora_forward(model: torch.nn.Module) -> int:
    """Switch every LoRA layer over a fake-quantized linear to the merged forward. Returns the count."""
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for mod in model.modules():
        if isinstance(mod, LoraLinear) and getattr(mod.get_base_layer(), "weight_fake_quantizer", None) is not None:
            mod.forward = types.MethodType(_merged_forward, mod)
            count += 1
    return count
