"""Learned weight scales (LSQ-style, torchao range learning): their start (absmax or MSE clip search), and saving
them beside the adapter so convert and --resume use exactly the trained ones."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qatkit.core.errors import RecipeError
from qatkit.core.io import atomic_file
from qatkit.quant.plan import stable_fqn

if TYPE_CHECKING:
    import torch


MSE_CLIP_RATIOS = tuple(round(0.5 + 0.02 * i, 2) for i in range(26))  # scale / absmax scale, 0.5 .. 1.0


def init_learned_scales(model: torch.nn.Module, mse: bool = False) -> None:
    """Compute each learnable weight scale from its weight now (torchao's initialize_fake_quantizers does this with a
    forward pass; the weight is all a weight scale needs): absmax, or with `mse` the clipped scale that minimises
    each group's squared rounding + clipping error (searched over MSE_CLIP_RATIOS, like GPTQ/AWQ clip search).
    A scale that deploys below float32 (int8-int4's bf16) is learned in float32 and used rounded
    (RoundedScaleFakeQuantizer)."""
    for mod in list(model.modules()):
        fq = getattr(mod, "weight_fake_quantizer", None)
        if getattr(getattr(fq, "config", None), "range_learning", False) and fq.scale is None:
            init_learned_scale(mod, mse)


def init_learned_scale(mod: torch.nn.Module, mse: bool = False) -> None:
    """One module's learnable weight scale from its weight as it is now (see init_learned_scales). A torchao
    quantizer is replaced by a fresh one, which computes its scale on its first call."""
    import torch

    fq = mod.weight_fake_quantizer
    with torch.no_grad():
        if callable(getattr(fq, "init_scale", None)):  # qatkit's own (GGUF) quantizer
            fq.init_scale(mod.weight)
        else:
            quantizer = type(fq)
            if fq.config.scale_precision not in (None, torch.float32):
                from qatkit.quant.rounded_scales import RoundedScaleFakeQuantizer

                quantizer = RoundedScaleFakeQuantizer
            mod.weight_fake_quantizer = fq = quantizer(fq.config)
            fq._initialized = True
            fq(mod.weight)
        if mse:
            clip_search(fq, mod.weight)


def clip_search(fq, weight: torch.Tensor) -> None:
    """Per group, keep the scale (a ratio of the absmax one) whose fake-quantized weight is closest to `weight`."""
    import torch

    absmax_scale = fq.scale.detach().clone()
    groups = absmax_scale.shape  # (out features, groups per row)

    def group_error() -> torch.Tensor:
        return (fq(weight) - weight).pow(2).reshape(*groups, -1).sum(-1)

    best_scale, best_err = absmax_scale.clone(), group_error()
    for ratio in MSE_CLIP_RATIOS[:-1]:
        fq.scale.copy_(absmax_scale * ratio)
        err = group_error()
        better = err < best_err
        best_scale = torch.where(better, fq.scale, best_scale)
        best_err = torch.where(better, err, best_err)
    fq.scale.copy_(best_scale)


def round_learned_scales(model: torch.nn.Module) -> None:
    """Before convert: each scale learned in float32 but deployed rounded, as the forward uses it."""
    for mod in model.modules():
        fq = getattr(mod, "weight_fake_quantizer", None)
        if callable(getattr(fq, "round_scale", None)):
            fq.round_scale()


def has_learned_scale(module: torch.nn.Module) -> bool:
    """Whether the module's weight fake quantizer trains its scale."""
    import torch

    return isinstance(getattr(getattr(module, "weight_fake_quantizer", None), "scale", None), torch.nn.Parameter)


def learned_scales(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Module fqn -> its trainable weight scale (empty unless the scheme learns scales)."""
    return {
        stable_fqn(fqn): mod.weight_fake_quantizer.scale for fqn, mod in model.named_modules() if has_learned_scale(mod)
    }


def save_learned_scales(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:  # its presence in a trainer checkpoint marks the checkpoint complete
        save_file({fqn: p.detach().contiguous() for fqn, p in learned_scales(model).items()}, str(tmp))


def load_learned_scales(model: torch.nn.Module, path: Path) -> None:
    """Put trained scales back into a model prepared with the same scheme (refuses a partial match)."""
    import torch
    from safetensors.torch import load_file

    if not path.is_file():
        raise RecipeError(f"{path} is missing: the run was trained with qat.learn_scales, its scales are needed")
    saved, scales = load_file(str(path)), learned_scales(model)
    if saved.keys() != scales.keys():
        raise RecipeError(
            f"{path} holds scales for other modules than this model learns ({len(saved)} vs {len(scales)})"
        )
    with torch.no_grad():
        for fqn, p in scales.items():
            p.copy_(saved[fqn])
