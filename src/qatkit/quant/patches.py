"""Changes to torchao's fake quantizers (same forward, better training) and inspection of a prepared model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from qatkit.quant.plan import stable_fqn

if TYPE_CHECKING:
    import torch


def fake_quantizers(model: torch.nn.Module) -> dict[str, tuple[str | None, str | None]]:
    """fqn -> (activation fake-quantizer class, weight fake-quantizer class) for every prepared module."""
    out = {}
    for fqn, mod in model.named_modules():
        wfq = getattr(mod, "weight_fake_quantizer", None)
        if wfq is None:
            continue
        afq = getattr(mod, "activation_fake_quantizer", None)
        out[fqn] = (type(afq).__name__ if afq is not None else None, type(wfq).__name__)
    return out


def each_fake_quantizer(model: torch.nn.Module) -> list[tuple[str, str, torch.nn.Module]]:
    """(fqn, "weight" or "activation", fake quantizer) for every fake quantizer in the model: what diagnostics switch
    on and off (`fq.enabled`) to see what each part costs."""
    return [
        (fqn, kind, fq)
        for fqn, mod in model.named_modules()
        for kind in ("weight", "activation")
        if (fq := getattr(mod, f"{kind}_fake_quantizer", None)) is not None
    ]


@contextlib.contextmanager
def fake_quant_off(quantizers: Iterable[torch.nn.Module]) -> Iterator[None]:
    """The given fake quantizers pass their input through unchanged inside the block, and are on again after it."""
    quantizers = list(quantizers)
    for fq in quantizers:
        fq.enabled = False
    try:
        yield
    finally:
        for fq in quantizers:
            fq.enabled = True


@contextlib.contextmanager
def weight_fake_quant_once(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block every weight fake quantizer computes its output on its first call and returns that same
    tensor on the later ones: for a loss that runs the model more than once on weights that do not change in
    between (the task batch and distill.general's batch of one step). The forwards are unchanged, and the backward
    runs once through each fake quantizer (the shared output's autograd node) instead of once per forward."""
    once = []
    for _, kind, fq in each_fake_quantizer(model):
        if kind != "weight":
            continue
        own, values = fq.__dict__.get("forward"), []

        def forward(w, _compute=fq.forward, _values=values):
            if not _values:
                _values.append(_compute(w))
            elif _values[0].shape != w.shape:
                raise RuntimeError(f"weight_fake_quant_once: a {tuple(w.shape)} weight after a {_values[0].shape}")
            return _values[0]

        fq.forward, fq._qatkit_once = forward, values
        once.append((fq, own))
    try:
        yield
    finally:
        for fq, own in once:
            del fq._qatkit_once
            if own is None:
                del fq.forward
            else:
                fq.forward = own


def fake_quantize_weight(fq: torch.nn.Module, weight: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fq(weight()), or, inside a `weight_fake_quant_once` block after its first call, the block's value without
    computing weight() (a merged-LoRA weight W + s·BA costs a pass over W)."""
    values = getattr(fq, "_qatkit_once", None)
    return values[0] if values else fq(weight())


def cache_frozen_weight_fake_quant(model: torch.nn.Module) -> int:
    """Compute fq(W) once for frozen weights instead of every step (same values, so parity is unchanged).

    With LoRA the base weights never change, so their fake-quantized copy is a constant. Any change of
    the weight's values (e.g. a LoRA merge) invalidates it; a weight that requires grad (full finetuning),
    the merged-LoRA input W + s·BA, or a weight with a learned scale is never cached, nor the output of a quantizer
    turned off (fake_quant_off). Costs two extra copies of each cached weight.
    Returns the number of fake quantizers wrapped.
    """
    import torch

    count = 0

    for mod in model.modules():
        fq = getattr(mod, "weight_fake_quantizer", None)
        if (
            fq is None
            or getattr(fq, "_qatkit_cache", None) is not None
            or getattr(fq, "input_changes_every_step", False)
            or getattr(fq.config, "range_learning", False)
        ):
            continue

        fq._qatkit_cache = {}
        original = fq.forward

        def forward(w, _orig=original, _cache=fq._qatkit_cache, _fq=fq):
            # off (fake_quant_off): the output is W itself, which must not be cached
            if w.requires_grad or not getattr(_fq, "enabled", True):
                return _orig(w)
            # a private copy of the source: `.data` updates (peft's merge) bypass the version counter, so
            # only comparing values is safe; one comparison costs far less than the fake quant it replaces
            source = _cache.get("source")
            if source is None or source.shape != w.shape or source.dtype != w.dtype or not torch.equal(source, w):
                _cache["source"], _cache["value"] = w.detach().clone(), _orig(w).detach()
            return _cache["value"]

        fq.forward = forward
        count += 1
    return count


def signature(model: torch.nn.Module) -> dict[str, str]:
    """fqn -> the exact fake-quantize configs in the forward; used to prove convert rebuilt what was trained."""
    out = {}
    for fqn, mod in model.named_modules():
        wfq = getattr(mod, "weight_fake_quantizer", None)
        if wfq is not None:
            afq = getattr(mod, "activation_fake_quantizer", None)
            act = repr(getattr(afq, "config", None)) if afq is not None else "None"
            out[stable_fqn(fqn)] = f"act={act} weight={getattr(wfq, 'config', None)!r}"
    return out


def use_straight_through_fp8(model: torch.nn.Module) -> None:
    """Wrap fp8 fake quantizers in a straight-through estimator.

    torchao 0.18 casts the gradient of its fp8 fake quant to fp8 without a scale, which zeroes almost
    all of it; the STE passes the gradient through unchanged while the forward stays bit-identical.
    """
    import torch

    class _STE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, fq):
            with torch.no_grad():
                return fq(x)

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    for mod in model.modules():
        for attr in ("activation_fake_quantizer", "weight_fake_quantizer"):
            fq = getattr(mod, attr, None)
            if fq is not None and "Float8" in type(fq).__name__ and not getattr(fq, "_qatkit_ste", False):
                original = fq.forward
                fq.forward = lambda x, _orig=original: _STE.apply(x, _orig)
                fq._qatkit_ste = True
