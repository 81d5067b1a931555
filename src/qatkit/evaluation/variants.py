"""The models an eval compares, in display order: name, label, plot colour. Every table, plot and benchmark takes
them from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VariantInfo:
    name: str
    label: str
    colour: str


VARIANTS = (
    VariantInfo("bf16", "base, original precision", "#777777"),
    VariantInfo("ptq", "base, PTQ (same scheme, no training)", "#cc6644"),
    VariantInfo("ft-bf16", "fine-tuned without QAT", "#999999"),
    VariantInfo("ft-ptq", "fine-tuned without QAT, then PTQ", "#dd9977"),
    VariantInfo("qat", "fine-tuned with QAT, converted", "#3366aa"),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
CONTROL_BASELINES = ("ft-bf16", "ft-ptq")  # scored from the no-QAT control fine-tune
_BY_NAME = {v.name: v for v in VARIANTS}


def label(name: str) -> str:
    return _BY_NAME[name].label if name in _BY_NAME else name


def colour(name: str) -> str:
    return _BY_NAME[name].colour if name in _BY_NAME else "#5599cc"


def order(name: str) -> int:
    """Position in tables and plots; unknown names last."""
    return VARIANT_NAMES.index(name) if name in _BY_NAME else len(VARIANTS)
