"""GPTQ (Frantar et al. 2022) as the start of QAT: the integers of each learned-scale linear chosen with error
feedback on calibration activations instead of rounded to nearest, so training starts from a quantized model that
already recovers part of what round-to-nearest PTQ loses.

The scales stay those the fake quantizers start from (absmax or MSE clip search, `qat.scale_init`): GPTQ with static
groups, so the fake quantizer maps the GPTQ weights to themselves and training, convert and export see exactly the
GPTQ model at step 0. Layers are processed in order, each calibrated on the outputs of the already-quantized layers
before it ("true sequential"); lm_head last, on the final norm's output.

Imported only inside functions, so torch at module level here never reaches `qatkit --help`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from qatkit.core import interrupts
from qatkit.core.errors import RecipeError
from qatkit.quant.patches import fake_quant_off
from qatkit.quant.plan import stable_fqn
from qatkit.quant.scales import has_learned_scale

log = logging.getLogger(__name__)

LAZY_BLOCK = 128  # columns updated at once before the trailing weights get the accumulated error (GPTQ's B)


class _Grid:
    """A linear's weight grid as its fake quantizer applies it, per group on the scale as the forward uses it
    (rounded to the precision it deploys in): torchao's q = clamp(round(w · (1/s)) + z), dequantized (q - z) · s;
    a GGUF block's q from w / d, dequantized q · d (zero point 0)."""

    def __init__(self, fq, weight: torch.Tensor):
        rows = weight.shape[0]
        self.scale = fq.scale.detach().to(fq.config.scale_precision or torch.float32).float().reshape(rows, -1)
        self.group_size = weight.shape[1] // self.scale.shape[1]
        self._gguf = getattr(fq.config, "qtype", None)
        if self._gguf:
            self.zero = torch.zeros_like(self.scale)
        else:
            from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS

            self.zero = fq.zero_point.detach().float().reshape(rows, -1)
            self.qmin, self.qmax = _DTYPE_TO_QVALUE_BOUNDS[fq.config.dtype]

    def column(self, w: torch.Tensor, col: int) -> torch.Tensor:
        g = col // self.group_size
        s, z = self.scale[:, g], self.zero[:, g]
        if self._gguf:
            from qatkit.quant.gguf_grid import levels_with_scale

            return levels_with_scale(w / torch.where(s == 0, 1.0, s), self._gguf) * s
        q = torch.clamp(torch.round(w * (1.0 / s)) + z, self.qmin, self.qmax)
        return (q - z) * s


def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, grid: _Grid, damp: float) -> torch.Tensor:
    """GPTQ of one weight (out, in) against H = 2 XᵀX / n of its inputs: each column quantized in turn, its error
    spread over the columns not yet quantized through the inverse Hessian's Cholesky factor. Returns the
    quantized weight (float32, on the grid)."""
    w = weight.detach().float().clone()
    h = hessian.clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    quantized = torch.zeros_like(w)
    for start in range(0, cols, LAZY_BLOCK):
        end = min(start + LAZY_BLOCK, cols)
        block, errors, h_block = (
            w[:, start:end].clone(),
            torch.zeros(w.shape[0], end - start),
            h_inv[start:end, start:end],
        )
        for i in range(end - start):
            column = grid.column(block[:, i], start + i)
            quantized[:, start + i] = column
            err = (block[:, i] - column) / h_block[i, i]
            block[:, i:] -= err[:, None] * h_block[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return quantized


class _Hessians:
    """Accumulates 2 XᵀX over the real (unpadded) tokens entering each given linear."""

    def __init__(self, linears: dict[str, torch.nn.Module], mask: torch.Tensor):
        self.sums = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}
        self.tokens = int(mask.sum())
        self._mask = mask
        self._hooks = [m.register_forward_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name: str):
        def accumulate(module, args, output):
            x = args[0][self._mask].float()
            self.sums[name] += 2 * x.T @ x

        return accumulate

    def close(self) -> dict[str, torch.Tensor]:
        for hook in self._hooks:
            hook.remove()
        return {n: s / self.tokens for n, s in self.sums.items()}


def _layer_inputs(decoder, layers, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The first layer's hidden states, and each layer's keyword arguments (position embeddings, attention mask:
    Gemma 3 gives sliding-window and global layers different ones), from one forward of the decoder (not the
    whole model: Gemma 3's logits for 128 calibration sequences of 128 tokens alone would take 17 GB)."""
    seen: dict = {"kwargs": []}

    def capture(module, args, kwargs):
        seen.setdefault("hidden", args[0] if args else kwargs["hidden_states"])
        seen["kwargs"].append({k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")})

    hooks = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in layers]
    try:
        decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["hidden"], seen["kwargs"]


def _learned_scale_linears(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.nn.Module]:
    return {
        f"{prefix}{n}": m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and has_learned_scale(m)
    }


def _quantize_linears(linears: dict[str, torch.nn.Module], hessians: dict[str, torch.Tensor], damp: float):
    for name, linear in linears.items():
        grid = _Grid(linear.weight_fake_quantizer, linear.weight)
        linear.weight.copy_(gptq_weight(linear.weight, hessians[name], grid, damp).to(linear.weight.dtype))


def gptq_(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, damp: float = 0.01, targets: str = "all"
) -> list[str]:
    """GPTQ every learned-scale linear of a QAT-prepared decoder in place (layer by layer, then the output
    layer) on the calibration batch, or only the output layer (`targets="lm_head"`, on the outputs of the decoder
    as its fake quantizers leave it); returns the stable names of the linears it changed. Weight fake quantization
    is off while a layer's own inputs are measured and on for the layers already done."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise RecipeError(f"qat.gptq: {type(model).__name__} has no decoder layer stack (model.get_decoder().layers)")
    mask = attention_mask.bool()
    done: list[str] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        names = {id(m): n for n, m in model.named_modules()}
        head = model.get_output_embeddings()
        head_linears = _learned_scale_linears(head, prefix=names[id(head)]) if head is not None else {}
        if targets == "lm_head":
            if not head_linears:
                raise RecipeError("qat.gptq.targets: lm_head, but this recipe does not quantize lm_head")
            normed = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        else:
            hidden, layer_kwargs = _layer_inputs(decoder, layers, input_ids, attention_mask)
            for layer, kwargs in zip(layers, layer_kwargs, strict=True):
                interrupts.stop_if_requested("in GPTQ (--resume starts it again)")
                linears = _learned_scale_linears(layer, prefix=names[id(layer)] + ".")
                hessians = _Hessians(linears, mask)
                with fake_quant_off(m.weight_fake_quantizer for m in linears.values()):
                    layer(hidden, **kwargs)
                _quantize_linears(linears, hessians.close(), damp)
                out = layer(hidden, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
                done += linears
            normed = decoder.norm(hidden)
        if head_linears:
            hessians = _Hessians(head_linears, mask)
            with fake_quant_off(m.weight_fake_quantizer for m in head_linears.values()):
                head(normed)
            _quantize_linears(head_linears, hessians.close(), damp)
            done += head_linears
    model.train(was_training)
    return [stable_fqn(n) for n in done]


def save_gptq_weights(model: torch.nn.Module, names: list[str], path: Path) -> None:
    """The GPTQ weights as their integers and the scales they sit on (what rebuilds them exactly, at about a byte a
    weight), so convert and --resume start LoRA from the same base."""
    from safetensors.torch import save_file

    modules = {stable_fqn(n): m for n, m in model.named_modules()}
    tensors = {}
    for name in names:
        linear = modules[name]
        grid = _Grid(linear.weight_fake_quantizer, linear.weight)
        scale = grid.scale.repeat_interleave(grid.group_size, dim=1)
        zero = grid.zero.repeat_interleave(grid.group_size, dim=1)
        tensors[f"{name}.q"] = (torch.round(linear.weight.detach().float() / scale) + zero).to(torch.int8)
        tensors[f"{name}.scale"] = grid.scale.contiguous()
        if grid.zero.any():  # symmetric grids: no zero points to keep
            tensors[f"{name}.zero"] = grid.zero.contiguous()
    save_file(tensors, str(path))


def load_gptq_weights(model: torch.nn.Module, path: Path) -> None:
    """Put the saved GPTQ weights into a model prepared with the same scheme (before LoRA is attached)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise RecipeError(f"{path} is missing: the run was trained from GPTQ weights (qat.gptq), they are needed")
    saved = load_file(str(path))
    modules = {stable_fqn(n): m for n, m in model.named_modules()}
    names = sorted({k.rsplit(".", 1)[0] for k in saved})
    missing = [n for n in names if n not in modules]
    if missing:
        raise RecipeError(f"{path} holds GPTQ weights of modules this model lacks: {', '.join(missing[:3])}")
    with torch.no_grad():
        for name in names:
            q, scale = saved[f"{name}.q"].float(), saved[f"{name}.scale"]
            zero = saved.get(f"{name}.zero", torch.zeros_like(scale))
            group_size = q.shape[1] // scale.shape[1]
            weight = (q - zero.repeat_interleave(group_size, 1)) * scale.repeat_interleave(group_size, 1)
            modules[name].weight.copy_(weight.to(modules[name].weight.dtype))
