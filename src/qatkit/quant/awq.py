"""AWQ's activation-aware channel scaling (Lin et al. 2023) as the start of QAT, on the gated MLP. Two pairs, each
exact in full precision (the model computes what it did) while the quantized linear's salient input channels get a
finer effective step inside their groups, which neither learned per-group scales nor a low-rank adapter can express:
- mlp_hidden: down_proj's input channel j times s_j, up_proj's output row j divided by it (down_proj reads
  act(gate(x)) * up(x)). up_proj's groups run along its input, so dividing a whole row only divides its group scales.
- mlp_input: gate_proj's and up_proj's input channels times s, the norm before the MLP divided by it (Llama's and
  Qwen3's post_attention_layernorm, Gemma 3's pre_feedforward_layernorm, whose weight w acts as 1 + w).

The search is AutoAWQ's / llm-compressor's: per layer, s = mean|x|^a / mean|w|^(1-a) (w normalized by its group's
absmax), normalized by sqrt(max s · min s), for a on a grid over [0, 1] plus s = 1, keeping the s whose output (the
MLP's for mlp_input, down_proj's for mlp_hidden), with the scaled linears' own fake quantizers on (weights, and
activations where the scheme has them) and the others off, is closest to the unquantized output on the calibration
tokens. Per layer mlp_input goes first, as in AutoAWQ. No clipping search: learned scales play that part.

Imported only inside functions, so torch at module level here never reaches `qatkit --help`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from qatkit.core import interrupts
from qatkit.core.errors import RecipeError
from qatkit.quant.patches import each_fake_quantizer, fake_quant_off
from qatkit.quant.plan import stable_fqn
from qatkit.quant.scales import has_learned_scale, init_learned_scale

log = logging.getLogger(__name__)

SEARCH_ROWS = 4096  # calibration tokens per layer the output error is measured on (all of them go into mean|x|)


def gated_mlps(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """fqn -> each module with an up_proj and a down_proj linear (Llama, Qwen3, Gemma 3 MLPs)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(getattr(m, "up_proj", None), torch.nn.Linear)
        and isinstance(getattr(m, "down_proj", None), torch.nn.Linear)
    }


def mlp_input_norm(model: torch.nn.Module, mlp_name: str) -> tuple[str, torch.nn.Module]:
    """The norm whose output the MLP reads (fqn, module): Gemma 3's pre_feedforward_layernorm (its
    post_attention_layernorm normalizes attention's output), else Llama's and Qwen3's post_attention_layernorm."""
    layer_name = mlp_name.rpartition(".")[0]
    layer = model.get_submodule(layer_name)
    for attr in ("pre_feedforward_layernorm", "post_attention_layernorm"):
        norm = getattr(layer, attr, None)
        if isinstance(getattr(norm, "weight", None), torch.nn.Parameter):
            return f"{layer_name}.{attr}", norm
    raise RecipeError(f"qat.awq mlp_input: no norm before {mlp_name} (pre_feedforward_ or post_attention_layernorm)")


def _norm_offset(norm: torch.nn.Module) -> float:
    """Gemma's RMSNorms multiply by 1 + weight, the others by weight."""
    return 1.0 if type(norm).__name__.startswith("Gemma") else 0.0


def _quantizers(*modules: torch.nn.Module) -> list[torch.nn.Module]:
    return [fq for m in modules for _, _, fq in each_fake_quantizer(m)]


class _Inputs:
    """Per module: mean |x| per input channel over the real tokens, and up to SEARCH_ROWS of those rows."""

    def __init__(self, modules: dict[str, torch.nn.Module], mask: torch.Tensor, seed: int = 0):
        flat = mask.reshape(-1).nonzero().squeeze(-1)
        picked = torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))[:SEARCH_ROWS]
        self._real, self._rows = mask.bool(), picked.sort().values
        self.mean_abs: dict[str, torch.Tensor] = {}
        self.rows: dict[str, torch.Tensor] = {}
        self._hooks = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def keep(module, args, output):
            x = args[0][self._real].float()
            self.mean_abs[name] = x.abs().mean(0)
            self.rows[name] = x[self._rows.to(x.device)]

        return keep

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _candidates(x_mean: torch.Tensor, weight: torch.Tensor, group_size: int | None, grid: int):
    """s = 1, then AutoAWQ's duo-scaling candidates for each a in 0, 1/(grid-1), ..., 1 (group_size None: one group
    a row)."""
    yield torch.ones_like(x_mean)
    w = weight.detach().float().abs()
    rows, cols = w.shape
    group_size = group_size or cols
    grouped = w.reshape(rows, cols // group_size, group_size)
    w_mean = (grouped / grouped.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(rows, cols).mean(0)
    for i in range(grid):
        a = i / (grid - 1)
        s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        yield torch.where(torch.isfinite(s), s, torch.ones_like(s))


def _search(linears, forward, inputs: _Inputs, key: str, group_size, grid, mse) -> torch.Tensor:
    """The candidate s whose output forward(x / s) on the inputs measured at `key`, with each linear's input channels
    times s, is closest to the unscaled unquantized output; the linears get their weights back."""
    x, x_mean = inputs.rows[key], inputs.mean_abs[key]
    weights = [lin.weight.detach().float().clone() for lin in linears]
    with fake_quant_off(_quantizers(*linears)):
        want = forward(x)
    best, best_err = None, None
    for s in _candidates(x_mean, torch.cat(weights), group_size, grid):
        for lin, w in zip(linears, weights, strict=True):
            lin.weight.copy_(w * s)
            if has_learned_scale(lin):
                init_learned_scale(lin, mse)
        err = (forward(x / s) - want).pow(2).mean().item()
        if best_err is None or err < best_err:
            best, best_err = s, err
    for lin, w in zip(linears, weights, strict=True):
        lin.weight.copy_(w)  # the search's own copy, exact in the weights' dtype
    return best


def awq_(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    group_size: int | None,
    grid: int = 20,
    mse: bool = False,
    channels: Sequence[str] = ("mlp_hidden",),
) -> dict[str, torch.Tensor]:
    """Scale the `channels` pairs of every gated MLP of a QAT-prepared model in place, each by the s its search
    picks on the calibration batch (inputs measured with fake quantization off, as AWQ measures the unquantized
    model; the scaled model computes the same, so they hold for every pair); the scaled linears' learned scales, if
    any, start again from the new weights. Returns the stable name of each scaled module -> its s: the norm's for
    mlp_input, the MLP's for mlp_hidden."""
    mlps = gated_mlps(model)
    if not mlps:
        raise RecipeError(f"qat.awq: {type(model).__name__} has no gated MLP (up_proj and down_proj linears)")
    norms = {name: mlp_input_norm(model, name) for name in mlps} if "mlp_input" in channels else {}
    watched = {norm_name: mlps[name] for name, (norm_name, _) in norms.items()}  # the MLP's input
    if "mlp_hidden" in channels:
        watched |= {name: mlp.down_proj for name, mlp in mlps.items()}
    was_training = model.training
    model.eval()
    inputs = _Inputs(watched, attention_mask)
    with torch.no_grad():
        try:
            with fake_quant_off(_quantizers(model)):
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        finally:
            inputs.close()
        chosen = {}
        for name, mlp in mlps.items():
            interrupts.stop_if_requested("in AWQ's search (--resume searches again)")
            scaled = set()
            if name in norms:
                norm_name, norm = norms[name]
                with fake_quant_off(_quantizers(mlp.down_proj)):
                    s = _search([mlp.gate_proj, mlp.up_proj], mlp, inputs, norm_name, group_size, grid, mse)
                apply_mlp_input_scale(norm, mlp, s)
                chosen[stable_fqn(norm_name)] = s
                scaled |= {mlp.gate_proj, mlp.up_proj}
            if "mlp_hidden" in channels:
                s = _search([mlp.down_proj], mlp.down_proj, inputs, name, group_size, grid, mse)
                apply_mlp_hidden_scale(mlp, s)
                chosen[stable_fqn(name)] = s
                scaled |= {mlp.up_proj, mlp.down_proj}
            for linear in scaled:
                if has_learned_scale(linear):
                    init_learned_scale(linear, mse)
    model.train(was_training)
    return chosen


def apply_mlp_input_scale(norm: torch.nn.Module, mlp: torch.nn.Module, s: torch.Tensor) -> None:
    """gate_proj's and up_proj's input channels times s, the norm's effective weight divided by it (in float32,
    then the weights' dtype)."""
    offset = _norm_offset(norm)
    with torch.no_grad():
        norm.weight.copy_(((norm.weight.float() + offset) / s - offset).to(norm.weight.dtype))
        for linear in (mlp.gate_proj, mlp.up_proj):
            linear.weight.copy_((linear.weight.float() * s).to(linear.weight.dtype))


def apply_mlp_hidden_scale(mlp: torch.nn.Module, s: torch.Tensor) -> None:
    """down_proj's input channels times s, up_proj's output rows divided by it (in float32, then the weights' dtype)."""
    with torch.no_grad():
        mlp.down_proj.weight.copy_((mlp.down_proj.weight.float() * s).to(mlp.down_proj.weight.dtype))
        mlp.up_proj.weight.copy_((mlp.up_proj.weight.float() / s[:, None]).to(mlp.up_proj.weight.dtype))


def save_awq_scales(scales: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({name: s.contiguous() for name, s in scales.items()}, str(path))


def load_awq_scales(model: torch.nn.Module, path: Path, channels: Sequence[str] = ("mlp_hidden",)) -> dict:
    """Scale a freshly loaded model's MLPs as the run's were (before LoRA is attached, learned scales loaded after);
    returns the scales."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise RecipeError(f"{path} is missing: the run was trained on AWQ-scaled weights (qat.awq), they are needed")
    scales = load_file(str(path))
    try:
        apply_awq_scales(model, scales, channels)
    except ValueError as e:
        raise RecipeError(f"{path} holds AWQ scales for {e}") from None
    return scales


def apply_awq_scales(model: torch.nn.Module, scales: dict[str, torch.Tensor], channels: Sequence[str]) -> set:
    """Scale a model's MLPs (and norms) by `scales`, awq_'s result, pair by pair in the search's order. Returns the
    linears scaled (ValueError if `scales` names other modules than the model's `channels` pairs)."""
    mlps = gated_mlps(model)
    norms = {name: mlp_input_norm(model, name) for name in mlps} if "mlp_input" in channels else {}
    expected = {stable_fqn(norm_name) for norm_name, _ in norms.values()}
    if "mlp_hidden" in channels:
        expected |= {stable_fqn(name) for name in mlps}
    if scales.keys() != expected:
        raise ValueError(f"other modules than this model's {'/'.join(channels)} pairs")
    scaled = set()
    for name, mlp in mlps.items():
        if name in norms:
            norm_name, norm = norms[name]
            apply_mlp_input_scale(norm, mlp, scales[stable_fqn(norm_name)])
            scaled |= {mlp.gate_proj, mlp.up_proj}
        if "mlp_hidden" in channels:
            apply_mlp_hidden_scale(mlp, scales[stable_fqn(name)])
            scaled |= {mlp.up_proj, mlp.down_proj}
    return scaled


def scale_lora_like_awq(model: torch.nn.Module, scales: dict[str, torch.Tensor], channels: Sequence[str]) -> None:
    """The LoRA adapters of a peft-wrapped model whose base MLPs apply_awq_scales scaled by `scales`, scaled alike,
    so that each linear's W + s·BA is scaled as its W is (a control's adapter, trained on the unscaled weights, for
    qat.init_from: control): A's columns times s where the linear's input channels are, B's rows divided by s
    where its output rows are."""
    # gated_mlps' MLPs, whose linears peft has wrapped
    mlps = {name: m for name, m in model.named_modules() if hasattr(m, "up_proj") and hasattr(m, "down_proj")}

    def rescale(linears, side: str, scale) -> None:  # in float32, then the adapter's dtype, as the weights are
        for linear in linears:
            for adapter in getattr(linear, side, {}).values():
                adapter.weight.copy_(scale(adapter.weight.float()).to(adapter.weight.dtype))

    with torch.no_grad():
        for name, mlp in mlps.items():
            if "mlp_input" in channels:  # gate_proj's and up_proj's input channels times s
                s = scales[stable_fqn(mlp_input_norm(model, name)[0])]
                rescale([mlp.gate_proj, mlp.up_proj], "lora_A", lambda a, s=s: a * s)
            if "mlp_hidden" in channels:  # down_proj's input channels times s, up_proj's output rows divided by it
                s = scales[stable_fqn(name)]
                rescale([mlp.down_proj], "lora_A", lambda a, s=s: a * s)
                rescale([mlp.up_proj], "lora_B", lambda b, s=s: b / s[:, None])
