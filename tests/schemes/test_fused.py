"""qatkit.quant.fused: torchao's fake quantize ops as single autograd Functions, bit for bit the same forward and
gradients as torchao's own ops."""

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
    torchaos, holder = IntxFakeQuantizer(config), torch.nn.Module()
    holder.activation_fake_quantizer = ours = IntxFakeQuantizer(config)
    assert fused.use_fused_token_fake_quant(holder) == 1

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


def test_linears_reading_one_input_share_its_activation_fake_quant(tiny_model_dir, monkeypatch):
    """q/k/v_proj (and gate/up_proj) fake-quantize the same tensor once: 4 per-token fake quants a decoder layer
    instead of 7, and with them the same logits bit for bit and the same gradients but for rounding."""
    from qatkit.models.loading import load_model_and_tokenizer
    from qatkit.quant.apply import prepare
    from qatkit.quant.patches import each_fake_quantizer
    from qatkit.recipe import load_recipe

    from ..conftest import TINY_RECIPE

    recipe = load_recipe(TINY_RECIPE, [f"model.name_or_path={tiny_model_dir}"])  # int8-int4
    model, _ = load_model_and_tokenizer(recipe.model)
    prepare(model, recipe.quant)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    calls = []
    apply = fused.TokenFakeQuantize.apply
    monkeypatch.setattr(fused.TokenFakeQuantize, "apply", lambda *args: calls.append(1) or apply(*args))

    def logits_and_grads():
        calls.clear()
        model.zero_grad()
        logits = model(ids).logits
        logits.float().square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared, shared_grads = logits_and_grads()
    shared_calls = len(calls)
    with torch.inference_mode():  # inference tensors have no version counter: fake-quantized one by one
        assert torch.equal(model(ids).logits, shared)
    for fq in [fq for _, kind, fq in each_fake_quantizer(model) if kind == "activation"]:
        del fq._per_token_forward  # torchao's own: each quantizer on its own
    alone, alone_grads = logits_and_grads()

    layers = model.config.num_hidden_layers
    assert shared_calls == 4 * layers + 1  # + lm_head
    assert torch.equal(shared, alone)
    assert shared_grads.keys() == alone_grads.keys() and shared_grads
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, alone_grads[name], msg=name)
