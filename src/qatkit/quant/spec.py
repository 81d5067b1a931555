"""QuantSpec: a recipe's `qat` section resolved once (scheme, group size, lm_head, learned scales).

Everything downstream (module plan, prepare, convert, PTQ baselines, cache keys, the report) takes a QuantSpec,
so no stage re-derives the group size or the lm_head choice from the recipe on its own.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Literal

from qatkit.core.errors import RecipeError
from qatkit.quant.registry import Scheme, get_scheme


@dataclass(frozen=True)
class QuantSpec:
    scheme: Scheme
    group_size: int | None  # None: one scale per output channel (or the scheme's own fixed granularity)
    quantize_lm_head: bool
    learn_scales: bool = False
    scale_init: Literal["absmax", "mse"] = "absmax"

    @classmethod
    def resolve(
        cls,
        scheme: str,
        group_size: int | None = None,
        quantize_lm_head: bool | None = None,
        learn_scales: bool | None = None,
        scale_init: Literal["absmax", "mse"] | None = None,
    ) -> QuantSpec:
        """The named scheme with the given overrides (a recipe's `qat` settings; None: the scheme's default)."""
        entry = get_scheme(scheme)
        return cls(
            scheme=entry,
            group_size=entry.default_group_size if group_size is None else group_size,
            quantize_lm_head=entry.quantize_lm_head if quantize_lm_head is None else quantize_lm_head,
            learn_scales=bool(learn_scales),
            scale_init=scale_init or "absmax",
        )

    @classmethod
    def named(cls, name: str) -> QuantSpec:
        """A scheme with its own defaults (e.g. `qatkit convert --from DIR --scheme NAME`, benchmarks)."""
        return cls.resolve(name)

    @property
    def name(self) -> str:
        return self.scheme.name

    @property
    def quantizes_embeddings(self) -> bool:
        return self.scheme.embedding_config is not None

    def for_ptq(self) -> QuantSpec:
        """Post-training quantization of the same grid: scales from the weights, nothing learned."""
        return dataclasses.replace(self, learn_scales=False)

    def linear_config(self):
        """The torchao base config of the linears (converts them; its fake-quant twin trains them)."""
        return self.scheme.linear_config(self.group_size)

    def embedding_config(self):
        return self.scheme.embedding_config()

    def linear_prepare_config(self):
        """QATConfig(step="prepare") for the linears: the fake-quantize configs torchao derives from the base config,
        or the scheme's own where torchao cannot. With learned scales: the weight scales static (computed once from
        the weights) and trainable (torchao range learning)."""
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
        from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs

        own = self.scheme.fake_quantize_configs
        if own is None and not self.learn_scales:
            return QATConfig(self.linear_config(), step="prepare")
        activation, weight = own(self.group_size) if own else _infer_fake_quantize_configs(self.linear_config())
        if self.learn_scales:
            if not isinstance(weight, IntxFakeQuantizeConfig):
                raise RecipeError(
                    f"qat.learn_scales: scheme {self.name} does not fake-quantize weights with intx scales"
                )
            weight = copy.copy(weight)
            weight.is_dynamic, weight.range_learning = False, True
        return QATConfig(activation_config=activation, weight_config=weight, step="prepare")

    @property
    def cache_id(self) -> str:
        """What determines the PTQ weights: the scheme (and its revision) plus any setting that differs from its
        defaults."""
        overrides = {
            "revision": self.scheme.revision if self.scheme.revision != 1 else None,
            "group_size": self.group_size if self.group_size != self.scheme.default_group_size else None,
            "quantize_lm_head": self.quantize_lm_head
            if self.quantize_lm_head != self.scheme.quantize_lm_head
            else None,
        }
        return " ".join([self.name, *(f"{k}={v}" for k, v in overrides.items() if v is not None)])

    def describe(self) -> str:
        """One line for reports and model cards, e.g. `int8-int4: group size 32, lm_head quantized, int8 embeddings`."""
        fixed = self.scheme.fixed_granularity
        parts = [
            "fixed granularity" if fixed else f"group size {self.group_size}" if self.group_size else "per channel",
            "lm_head quantized" if self.quantize_lm_head else "lm_head kept",
        ]
        if self.quantizes_embeddings:
            parts.append("int8 embeddings")
        if self.learn_scales:
            parts.append(f"learned scales ({self.scale_init} init)")
        return f"{self.name}: {', '.join(parts)}"

    def to_dict(self) -> dict:
        return {
            "scheme": self.name,
            "group_size": self.group_size,
            "quantize_lm_head": self.quantize_lm_head,
            "learn_scales": self.learn_scales,
            "scale_init": self.scale_init if self.learn_scales else None,
            "description": self.describe(),
        }
