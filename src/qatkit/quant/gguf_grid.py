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


def _block_scale(b: torch.Tensor, qtype: QType) -> torch.Tensor:
    """gguf-py's float32 d of each block of `b` (..., blocks, 32), shaped (..., blocks, 1)."""
    if qtype == "Q4_0":
        imax = b.abs().argmax(dim=-1, keepdim=True)  # the first maximum, as numpy's argmax
        peak = b.gather(-1, imax)
        return _divide(peak, -8.0, peak)
    if qtype == "Q8_0":
        amax = b.abs().amax(dim=-1, keepdim=True)
        return _divide(amax, 127.0, amax)
    raise ValueError(f"unknown GGUF type {qtype!r} (known: {', '.join(BITS)})")


def quantize(w: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF integers and scales of a weight: (q as int8, shaped like w; fp16 d, shaped (..., in_features // 32))."""
    b = _blocks(w)
    d = _block_scale(b, qtype)
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


QRANGE: dict[str, tuple[int, int]] = {"Q4_0": (-8, 7), "Q8_0": (-127, 127)}


def levels_with_scale(x: torch.Tensor, qtype: QType) -> torch.Tensor:
    """The integers of x = weight / d for a scale chosen elsewhere (learned, or GPTQ's): round half up for Q4_0 (as
    gguf-py's trunc(x + 8.5) - 8), half away from zero for Q8_0, clamped to the type's range. Any fp16 d is a valid
    GGUF block (llama.cpp only dequantizes d · q), so these blocks run in llama.cpp as they are."""
    qmin, qmax = QRANGE[qtype]
    return _round_level(x, qtype).clamp(qmin, qmax)


def _round_level(x: torch.Tensor, qtype: QType) -> torch.Tensor:
    return torch.floor(x + 0.5) if qtype == "Q4_0" else _round_half_away_from_zero(x)


def quantize_with_scale(w: torch.Tensor, scale: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF integers and fp16 scales of a weight on given per-block scales (out, in_features // 32)."""
    d = scale.detach().to(torch.float16).to(torch.float32).unsqueeze(-1)
    q = levels_with_scale(_blocks(w) / torch.where(d == 0, 1.0, d), qtype)  # a zero scale: an all-zero block
    return q.to(torch.int8).reshape(w.shape), d.squeeze(-1).to(torch.float16)


class _StraightThrough(torch.autograd.Function):
    """Forward: exactly `fn(x, qtype)` (the dequantized GGUF grid, or the rounding to levels); backward: the identity
    (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn, qtype: str) -> torch.Tensor:
        return fn(x, qtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def fake_quantize_with_scale(w: torch.Tensor, scale: torch.Tensor, qtype: QType) -> torch.Tensor:
    """dequantize(quantize_with_scale(w, scale)), differentiable LSQ-style: the rounding straight through, the
    clamp's gradient zero outside the range, the gradient reaching the float32 scale through its fp16 rounding."""
    qmin, qmax = QRANGE[qtype]
    d = scale.to(torch.float16).to(torch.float32).unsqueeze(-1)
    b = w.to(torch.float32).reshape(*w.shape[:-1], w.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    q = _StraightThrough.apply(torch.clamp(b / torch.where(d == 0, 1.0, d), qmin, qmax), _round_level, qtype)
    return (q * d).reshape(w.shape).to(w.dtype)


def fake_quantize(w: torch.Tensor, qtype: QType) -> torch.Tensor:
    """The weight llama.cpp would run: quantized to the GGUF grid and dequantized, in w's dtype."""
    return dequantize(*quantize(w, qtype)).to(w.dtype)


@dataclass(frozen=True, repr=False)
class GGUFFakeQuantizeConfig:
    """What a GGUF weight fake quantizer does; its repr is part of the QAT signature convert checks."""

    qtype: QType
    block_size: int = BLOCK_SIZE
    range_learning: bool = False  # True: each block's fp16 scale is a trained parameter (qat.learn_scales)
    scale_precision: ClassVar[torch.dtype] = torch.float16  # what GGUF stores

    def __repr__(self) -> str:  # range learning named only when on: signatures of runs without it are unchanged
        learning = ", range_learning=True" if self.range_learning else ""
        return f"GGUFFakeQuantizeConfig(qtype={self.qtype!r}, block_size={self.block_size}{learning})"

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

        self.scale: torch.nn.Parameter | None = None  # with config.range_learning: float32 (out, in // 32)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if self.config.range_learning:
            if self.scale is None:
                self.init_scale(w)
            return fake_quantize_with_scale(w, self.scale, self.config.qtype)
        return _StraightThrough.apply(w, fake_quantize, self.config.qtype)

    def init_scale(self, w: torch.Tensor) -> None:
        """The learned scale starts as gguf-py's own (float32, before its fp16 rounding)."""
        with torch.no_grad():
            d = _block_scale(_blocks(w), self.config.qtype)
        self.scale = torch.nn.Parameter(d.squeeze(-1).clone())

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 q shaped like w, fp16 scales (out, in // 32)): what convert stores."""
        with torch.no_grad():
            if self.config.range_learning:
                return quantize_with_scale(w, self.scale, self.config.qtype)
            return quantize(w, self.config.qtype)

    def extra_repr(self) -> str:
        return repr(self.config)
