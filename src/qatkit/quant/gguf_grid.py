"""llama.cpp's GGUF block grids Q4_0 and Q8_0 in torch, bit for bit as gguf-py quantizes them, and the fake quantizer
that trains linears on them (straight-through gradient).

gguf-py 0.19 (`gguf/quants.py`, `Q4_0` / `Q8_0.quantize_blocks`), on float32 blocks of 32 consecutive weights of a
row (along in_features):
  Q4_0: m = the block's element of largest |x| (signed; the first one on ties, like numpy's argmax), d = m / -8,
        id = 1/d (0 where d == 0), q = clip(trunc(x·id + 8.5), 0, 15) - 8, in [-8, 7]
  Q8_0: d = max|x| / 127, id = 1/d (0 where d == 0), q = round half away from zero (x·id), in [-127, 127]
  stored: q and fp16(d); dequantized: float32(fp16(d)) · q.
q is computed with the float32 d, the dequantized weight with the fp16 one, as llama.cpp does. Every step here is one
IEEE float32 operation, the same one numpy performs (tensor-by-tensor divisions, so no reciprocal shortcut for a
scalar divisor), which makes the results identical: tests/schemes/test_gguf.py compares them with gguf-py itself.
Weights of any dtype are cast to float32 first (gguf-py gets float32 data); the fake-quantized weight is cast back.

Imported only inside functions (the scheme factories), so torch at module level here never reaches `qatkit --help`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

BLOCK_SIZE = 32  # QK4_0 == QK8_0 == 32 in ggml
QType = Literal["Q4_0", "Q8_0"]
BITS: dict[str, int] = {"Q4_0": 4, "Q8_0": 8}


def _blocks(w: torch.Tensor) -> torch.Tensor:
    """(..., in_features) -> float32 (..., in_features // 32, 32)."""
    if w.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"GGUF blocks need in_features divisible by {BLOCK_SIZE}, got {w.shape[-1]}")
    return w.detach().to(torch.float32).reshape(*w.shape[:-1], w.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)


def _round_half_away_from_zero(x: torch.Tensor) -> torch.Tensor:
    """gguf-py's `np_roundf`: sign(x) · (floor|x| + floor(2·(|x| - floor|x|)))."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _divide(num: torch.Tensor | float, den: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """num / den as one float32 division per element (numpy's), never a multiplication by a rounded reciprocal."""

    def as_tensor(v: torch.Tensor | float) -> torch.Tensor:
        return v if isinstance(v, torch.Tensor) else torch.full_like(like, v)

    return torch.div(as_tensor(num), as_tensor(den))


def quantize(w: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF integers and scales of a weight: (q as int8, shaped like w; fp16 d, shaped (..., in_features // 32))."""
    b = _blocks(w)
    if qtype == "Q4_0":
        imax = b.abs().argmax(dim=-1, keepdim=True)  # the first maximum, as numpy's argmax
        peak = b.gather(-1, imax)
        d = _divide(peak, -8.0, peak)
    elif qtype == "Q8_0":
        amax = b.abs().amax(dim=-1, keepdim=True)
        d = _divide(amax, 127.0, amax)
    else:
        raise ValueError(f"unknown GGUF type {qtype!r} (known: {', '.join(BITS)})")
    inverse = torch.where(d == 0, torch.zeros_like(d), _divide(1.0, d, d))
    scaled = b * inverse
    if qtype == "Q4_0":
        q = torch.trunc(scaled + 8.5)  # gguf-py: trunc -> astype(uint8) -> clip(0, 15); finite values are 0..16
    else:
        q = _round_half_away_from_zero(scaled)
    # 1/d overflows to inf only in blocks whose max |x| is below ~2e-38 (Q4_0) / ~4e-37 (Q8_0), where fp16(d) is 0
    # anyway; numpy casts the resulting inf/nan to integer 0 on x86, and so do we (explicitly, not by C casting rules)
    q = torch.where(torch.isfinite(q), q, torch.zeros_like(q))
    if qtype == "Q4_0":
        q = q.clamp(0, 15) - 8
    return q.to(torch.int8).reshape(w.shape), d.squeeze(-1).to(torch.float16)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32(fp16 d) · q per block, in float32 (gguf-py's `dequantize_blocks`)."""
    blocks = q.to(torch.float32).reshape(*q.shape[:-1], q.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    return (blocks * scale.to(torch.float32).unsqueeze(-1)).reshape(q.shape)


def fake_quantize(w: torch.Tensor, qtype: QType) -> torch.Tensor:
    """The weight llama.cpp would run: quantized to the GGUF grid and dequantized, in w's dtype."""
    return dequantize(*quantize(w, qtype)).to(w.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: exactly the dequantized GGUF grid; backward: the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, qtype: str) -> torch.Tensor:
        return fake_quantize(w, qtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


@dataclass(frozen=True)
class GGUFFakeQuantizeConfig:
    """What a GGUF weight fake quantizer does; its repr is part of the QAT signature convert checks."""

    qtype: QType
    block_size: int = BLOCK_SIZE
    range_learning: ClassVar[bool] = False  # scales always come from the weights (read by qatkit's fq(W) cache)

    def __post_init__(self):
        if self.qtype not in BITS:
            raise ValueError(f"unknown GGUF type {self.qtype!r} (known: {', '.join(BITS)})")
        if self.block_size != BLOCK_SIZE:
            raise ValueError(f"GGUF {self.qtype} blocks hold {BLOCK_SIZE} weights, not {self.block_size}")

    @property
    def bits(self) -> int:
        return BITS[self.qtype]


class GGUFFakeQuantizer(torch.nn.Module):
    """A linear's `weight_fake_quantizer` for a GGUF grid: forward fq(W) bit-identical to gguf-py's
    quantize + dequantize, gradient straight through. `quantize(W)` gives convert the same integers and scales."""

    def __init__(self, config: GGUFFakeQuantizeConfig):
        super().__init__()
        self.config = config
        self.enabled = True  # torchao's enable/disable_linear_fake_quant toggle this
        self.input_changes_every_step = False  # set by the merged-LoRA forward: its input W + s·BA is never cached

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return _StraightThrough.apply(w, self.config.qtype)

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 q shaped like w, fp16 scales (out, in // 32)): what convert stores."""
        with torch.no_grad():
            return quantize(w, self.config.qtype)

    def extra_repr(self) -> str:
        return repr(self.config)
