"""qatkit.quant.fused: torchao's fake quantize ops as single autograd Functions, bit for bit the same forward and
gradients as torchao's own ops."""

import types

import pytest
import torch
from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer
from torchao.quantization.qat.utils import _fake_quantize_per_channel_group

from qatkit.quant import fused


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype])


def forward_and_grads(fn, tensors: list[torch.Tensor], grad: torch.Tensor, *args):
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves, *args)
    out.backward(grad)
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize(
    ("shape", "group_size", "qmin", "qmax", "scale_dtype"),
    [
        ((96, 128), 32, -8, 7, torch.bfloat16),  # int8-int4's weights: int4 groups, bf16 scales
        ((64, 96), 32, -8, 7, torch.float32),
        ((48, 64), 64, -128, 127, torch.bfloat16),  # one group a row
    ],
)
def test_group_fake_quantize_is_torchaos_op_bit_for_bit(shape, group_size, qmin, qmax, scale_dtype):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    # scales below the absmax one, so some weights clamp: the gradient's mask matters
    absmax = w.reshape(shape[0], -1, group_size).abs().amax(-1) / qmax
    scale = absmax * torch.empty(absmax.shape).uniform_(0.6, 1.1)
    zero_point = torch.zeros(scale.shape, dtype=torch.int32)
    grad = torch.randn(shape)

    def through(op):
        return lambda w, s: op(w, s.to(scale_dtype), zero_point, qmin, qmax, group_size)

    want = forward_and_grads(through(_fake_quantize_per_channel_group), [w, scale], grad)
    got = forward_and_grads(through(fused.GroupFakeQuantize.apply), [w, scale], grad)
    assert (want[1] == 0).any()  # some weights clamped: no gradient there
    for name, a, b in zip(["output", "weight grad", "scale grad"], want, got, strict=True):
        assert a.dtype == b.dtype and torch.equal(bits(a), bits(b)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_fake_quantize_is_torchaos_per_token_fake_quant_bit_for_bit(dtype):
    """int8-int4's activations: per token, asymmetric, dynamic; fp32 (the residual stream) and bf16 (autocast
    outputs) inputs, an all-zero token included."""
    torch.manual_seed(0)
    x = (torch.randn(3, 17, 64) * torch.rand(3, 17, 1) * 4).to(dtype)
    x[0, 0] = 0
    grad = torch.randn(x.shape).to(dtype)
    config = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False, is_dynamic=True)
    torchaos, ours = IntxFakeQuantizer(config), IntxFakeQuantizer(config)
    ours._per_token_forward = types.MethodType(fused._per_token_forward, ours)

    want = forward_and_grads(torchaos, [x], grad)
    got = forward_and_grads(ours, [x], grad)
    for name, a, b in zip(["output", "input grad"], want, got, strict=True):
        assert a.dtype == b.dtype == dtype and torch.equal(bits(a), bits(b)), name
    assert torch.equal(torchaos.scale, ours.scale) and torch.equal(torchaos.zero_point, ours.zero_point)


def test_prepare_fuses_every_dynamic_per_token_activation_quantizer(tiny_model_dir):
    from qatkit.models.loading import load_model_and_tokenizer
    from qatkit.quant.apply import prepare
    from qatkit.quant.patches import each_fake_quantizer
    from qatkit.recipe import load_recipe

    from ..conftest import TINY_RECIPE

    recipe = load_recipe(TINY_RECIPE, [f"model.name_or_path={tiny_model_dir}"])  # int8-int4
    model, _ = load_model_and_tokenizer(recipe.model)
    prepare(model, recipe.quant)
    activations = [fq for _, kind, fq in each_fake_quantizer(model) if kind == "activation"]
    assert activations and all(fq._per_token_forward.__func__ is fused._per_token_forward for fq in activations)
