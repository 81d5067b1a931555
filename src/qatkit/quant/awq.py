"""AWQ's activation-aware channel scaling (Lin et al. 2023) as the start of QAT, on the gated MLP's up_proj -> down_proj
pair: down_proj's input channel j is multiplied by s_j and up_proj's output row j divided by it. In full precision
the model is unchanged (down_proj(act(gate(x)) * up(x)) sees the same product); quantized, down_proj's salient input
channels get a finer effective step inside their groups, which neither learned per-group scales nor a low-rank
adapter can express. up_proj's groups run along its input, so dividing a whole row only divides its group scales.

The search is AutoAWQ's / llm-compressor's: per layer, s = mean|x|^a / mean|w|^(1-a) (w normalized by its group's
absmax), normalized by sqrt(max s · min s), for a on a grid over [0, 1] plus s = 1, keeping the s whose down_proj
output, through its own fake quantizers (weights, and activations where the scheme has them), is closest to the
unquantized output on the calibration tokens. No clipping search: learned scales play that part.

Imported only inside functions, so torch at module level here never reaches `qatkit --help`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from qatkit.core.errors import RecipeError
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


class _DownProjInputs:
    """Per MLP: mean |x| per input channel of down_proj over the real tokens, and up to SEARCH_ROWS of those rows."""

    def __init__(self, mlps: dict[str, torch.nn.Module], mask: torch.Tensor, seed: int = 0):
        flat = mask.reshape(-1).nonzero().squeeze(-1)
        picked = torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))[:SEARCH_ROWS]
        self._real, self._rows = mask.bool(), picked.sort().values
        self.mean_abs: dict[str, torch.Tensor] = {}
        self.rows: dict[str, torch.Tensor] = {}
        self._hooks = [mlp.down_proj.register_forward_hook(self._hook(n)) for n, mlp in mlps.items()]

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
    """AutoAWQ's duo-scaling candidates: s for each a in 0, 1/(grid-1), ..., 1 (group_size None: one group a row)."""
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


def _output_error(down: torch.nn.Module, weight: torch.Tensor, x: torch.Tensor, want: torch.Tensor, s, mse: bool):
    """Mean squared error of down_proj's quantized output with its input channels scaled by s."""
    down.weight.copy_(weight * s)
    if has_learned_scale(down):
        init_learned_scale(down, mse)
    return (down(x / s) - want).pow(2).mean().item()


def awq_(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, group_size: int | None, grid: int = 20, mse=False
):
    """Scale every gated MLP's up_proj / down_proj pair of a QAT-prepared model in place, each by the s its search
    picks on the calibration batch (fake quantization off while the inputs are measured, as AWQ measures the
    unquantized model); their learned scales, if any, start again from the new weights. Returns the stable name of
    each MLP -> its s."""
    mlps = gated_mlps(model)
    if not mlps:
        raise RecipeError(f"qat.awq: {type(model).__name__} has no gated MLP (up_proj and down_proj linears)")
    from qatkit.quant.patches import each_fake_quantizer, fake_quant_off

    was_training = model.training
    model.eval()
    inputs = _DownProjInputs(mlps, attention_mask)
    with torch.no_grad():
        try:
            with fake_quant_off(fq for _, _, fq in each_fake_quantizer(model)):
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        finally:
            inputs.close()
        chosen = {}
        for name, mlp in mlps.items():
            down, up = mlp.down_proj, mlp.up_proj
            weight, x = down.weight.detach().float().clone(), inputs.rows[name]
            want = x @ weight.T
            best, best_err = torch.ones_like(inputs.mean_abs[name]), None
            for s in [best, *_candidates(inputs.mean_abs[name], weight, group_size, grid)]:
                err = _output_error(down, weight, x, want, s, mse)
                if best_err is None or err < best_err:
                    best, best_err = s, err
            down.weight.copy_(weight)  # back from the last candidate: the search's own copy, exact in its dtype
            apply_awq_scale(mlp, best)
            if has_learned_scale(up):
                init_learned_scale(up, mse)
            if has_learned_scale(down):
                init_learned_scale(down, mse)
            chosen[stable_fqn(name)] = best
            log.debug("AWQ %s: output error %.3g", name, best_err)
    model.train(was_training)
    return chosen


def apply_awq_scale(mlp: torch.nn.Module, s: torch.Tensor) -> None:
    """down_proj's input channels times s, up_proj's output rows divided by it (in float32, then the weights' dtype)."""
    with torch.no_grad():
        mlp.down_proj.weight.copy_((mlp.down_proj.weight.float() * s).to(mlp.down_proj.weight.dtype))
        mlp.up_proj.weight.copy_((mlp.up_proj.weight.float() / s[:, None]).to(mlp.up_proj.weight.dtype))


def save_awq_scales(scales: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({name: s.contiguous() for name, s in scales.items()}, str(path))


def load_awq_scales(model: torch.nn.Module, path: Path) -> None:
    """Scale a freshly loaded model's MLPs as the run's were (before LoRA is attached, learned scales loaded after)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise RecipeError(f"{path} is missing: the run was trained on AWQ-scaled weights (qat.awq), they are needed")
    mlps = {stable_fqn(n): m for n, m in gated_mlps(model).items()}
    saved = load_file(str(path))
    if saved.keys() != mlps.keys():
        raise RecipeError(f"{path} holds AWQ scales for other modules than this model's MLPs")
    for name, s in saved.items():
        apply_awq_scale(mlps[name], s)
