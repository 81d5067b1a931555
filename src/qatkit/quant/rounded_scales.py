"""Learned weight scales that deploy in a lower precision than float32 (int8-int4's bf16): trained as float32
parameters, used rounded, in the forward and in convert alike.

Imported only inside functions, so torch and torchao at module level here never reach `qatkit --help`.
"""

from __future__ import annotations

import torch
from torchao.quantization.granularity import PerGroup
from torchao.quantization.qat import IntxFakeQuantizer
from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, ZeroPointDomain

from qatkit.quant.fused import GroupFakeQuantize


class RoundedScaleFakeQuantizer(IntxFakeQuantizer):
    """torchao's range-learning weight fake quantizer with the learned scale a float32 parameter (optimizer steps
    smaller than a bf16 step still add up), which the forward rounds to config.scale_precision: the scale convert
    stores, and the integers torchao computes from it (w * (1 / scale), the reciprocal in that precision too)."""

    def _per_channel_or_group_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:  # the first call: torchao computes the scale from the weight, in scale_precision
            super()._per_channel_or_group_forward(x)
            self.scale = torch.nn.Parameter(self.scale.detach().float())
        granularity = self.config.granularity
        group_size = granularity.group_size if isinstance(granularity, PerGroup) else x.shape[-1]
        qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[self.config.dtype]
        assert x.dim() == 2 and self.config.zero_point_domain == ZeroPointDomain.INT
        return GroupFakeQuantize.apply(
            x,
            self.scale.to(self.config.scale_precision),  # differentiable: the gradient reaches the float32 scale
            self.zero_point,
            qmin,
            qmax,
            group_size,
        )

    def round_scale(self) -> None:
        """Before convert: the scale as the forward uses it. torchao rounds a custom scale only for weights of
        another dtype than its weight_scale_dtype; this way it quantizes with this scale for bf16 weights too."""
        self.scale = torch.nn.Parameter(self.scale.detach().to(self.config.scale_precision), requires_grad=False)
