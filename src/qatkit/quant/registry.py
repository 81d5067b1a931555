"""The scheme registry: what each quantization scheme is, found by name or alias.

A scheme is one entry that yields both the QAT (fake-quant) step and the convert step from the same torchao
base config, so the quantizer used in training is by construction the one used at deployment. The built-in
entries are in `qatkit.quant.schemes`; a new scheme is one `register_scheme` call there (plus its quantizer).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from qatkit.core.errors import RecipeError

Hardware = Literal["cpu", "cuda", "cuda-sm89", "cuda-sm100"]


@dataclass(frozen=True)
class Scheme:
    name: str
    summary: str
    configs: str  # human-readable torchao configs, for `qatkit schemes`
    linear_config: Callable[[int | None], object]  # group_size -> torchao base config for linears
    weight_bits: int  # bits per quantized linear weight, before scales (size estimates, the checkpoint floor)
    default_group_size: int | None = None
    embedding_config: Callable[[], object] | None = None  # quantize input embeddings too
    quantize_lm_head: bool = False  # also quantize lm_head (untied first if tied); the recipe can override it
    train_on: Hardware = "cpu"
    convert_on: Hardware = "cpu"
    aliases: tuple[str, ...] = ()
    cpu_alternatives: str = ""
    notes: str = ""
    convert_packages: tuple[str, ...] = ()  # imported by torchao when converting (its CUDA kernels)
    straight_through_fp8: bool = False  # torchao casts fp8 fake-quant grads unscaled; use STE
    fixed_granularity: bool = False  # the torchao config sets its own groups/rows: qat.group_size cannot change them
    learnable_scales: bool = False  # range learning trains the weight scales and convert quantizes with them
    # group_size -> the linears' (activation, weight) torchao fake-quantize configs, where torchao cannot derive them
    # from linear_config itself (None: QATConfig(linear_config) derives them)
    fake_quantize_configs: Callable[[int | None], tuple[object | None, object]] | None = None
    revision: int = 1  # bumped when the scheme's quantized weights change: cached PTQ results are keyed by it
    # qatkit's own weight fake quantizer for the linears instead of the one torchao derives from linear_config: a
    # factory (range_learning: bool) of a torch Module with `quantize(w) -> (int8 qdata, scales)`, and with
    # range_learning a trainable `scale` and `init_scale(w)`. prepare puts it on torchao's
    # FakeQuantizedLinear; convert stores exactly those integers and scales in linear_config's intx tensor
    # (an IntxWeightOnlyConfig with PerGroup granularity), zero point 0
    weight_fake_quantizer: Callable[..., object] | None = None
    gguf_type: str | None = None  # the GGUF tensor type that holds the converted linears exactly (None: no GGUF export)
    export_formats: tuple[str, ...] = ()  # `qatkit export --format` targets whose runtime runs the converted model

    def exports(self, fmt: str) -> bool:
        """Whether `qatkit export --format fmt` takes this scheme's runs (gguf: when a GGUF type holds them)."""
        return fmt in self.export_formats or (fmt == "gguf" and self.gguf_type is not None)


_SCHEMES: dict[str, Scheme] = {}
_ALIASES: dict[str, str] = {}


def register_scheme(s: Scheme) -> Scheme:
    for key in (s.name, *s.aliases):
        if key in _SCHEMES or key in _ALIASES:
            raise ValueError(f"scheme {key!r} registered twice")
    _SCHEMES[s.name] = s
    _ALIASES.update({a: s.name for a in s.aliases})
    return s


def list_schemes() -> list[Scheme]:
    return list(_SCHEMES.values())


def canonical_name(name: str) -> str:
    name = name.strip().lower()
    if name in _SCHEMES:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    known = sorted([*_SCHEMES, *_ALIASES])
    close = difflib.get_close_matches(name, known, n=2)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown scheme {name!r}.{hint} Known: {', '.join(sorted(_SCHEMES))}")


def get_scheme(name: str) -> Scheme:
    try:
        return _SCHEMES[canonical_name(name)]
    except ValueError as e:
        raise RecipeError(str(e)) from None
