"""Small numeric helpers shared by convert (parity), eval and report."""

from __future__ import annotations

import math


def unique_param_count(model) -> int:
    """Parameters of `model`, counting tied (shared) tensors once."""
    seen: set[int] = set()
    return sum(p.numel() for p in model.parameters() if not (id(p) in seen or seen.add(id(p))))


def sqnr_db(reference, other) -> float:
    """Signal-to-quantization-noise ratio 20*log10(|ref| / |ref - other|) in dB; inf when identical."""
    ref = reference.double()
    noise = (ref - other.double()).norm().item()
    return math.inf if noise == 0 else 20 * math.log10(ref.norm().item() / noise)


def compare(reference, other) -> dict:
    return {
        "sqnr_db": sqnr_db(reference, other),
        "max_abs_diff": (reference.double() - other.double()).abs().max().item(),
    }


def normalized_degradation(
    acc: float | None, acc_bf16: float | None, acc_ptq: float | None, *, lower_is_better: bool = False
) -> float | None:
    """The seed cards' metric: (acc - acc_bf16) / (acc_bf16 - acc_ptq). 0 = bf16 quality, -1 = as bad as PTQ.

    `lower_is_better` (a loss, e.g. NLL): the same with the signs turned, so -1 still means as bad as PTQ.
    None when a figure is missing (a variant or metric not scored) or PTQ loses nothing.
    """
    if None in (acc, acc_bf16, acc_ptq):
        return None
    if lower_is_better:
        acc, acc_bf16, acc_ptq = -acc, -acc_bf16, -acc_ptq
    gap = acc_bf16 - acc_ptq
    return None if gap == 0 else (acc - acc_bf16) / gap
