"""The hf backend through the real pipeline (SFTTrainer, peft, torchao) on the tiny model."""

import json

import pytest
import torch

from qatkit.errors import GateError
from qatkit.pipeline import run_recipe
from qatkit.recipe import load_recipe

from ..conftest import TINY_RECIPE


def tiny_recipe(model_dir, *overrides):
    return load_recipe(TINY_RECIPE, [f"model.name_or_path={model_dir}", "train.max_steps=2", *overrides])


def test_lm_head_fake_quant_runs_inside_the_trainer(tiny_model_dir, tmp_path):
    """TRL fuses lm_head into a chunked log-prob kernel; with a quantized lm_head (int8-int4) qatkit must
    keep the lm_head's fake quantizers in the training forward, or training and deployment differ."""
    shapes = []

    def hook(mod, args, out):
        if type(mod).__name__ == "IntxFakeQuantizer" and args and args[0].dim() == 2:
            shapes.append(tuple(args[0].shape))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        run_recipe(tiny_recipe(tiny_model_dir), tmp_path / "run", only=["finetune"])
    finally:
        handle.remove()
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    lm_head_shape = (cfg.vocab_size, cfg.hidden_size)
    assert shapes.count(lm_head_shape) >= 2 * 2  # lm_head and embedding share the shape; both, every step


def test_convert_with_another_scheme_is_caught(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_recipe(tiny_recipe(tiny_model_dir), out, only=["finetune"])
    mismatched = tiny_recipe(tiny_model_dir, "qat.scheme=w4-intx")
    with pytest.raises(GateError, match="quantizer mismatch") as e:
        run_recipe(mismatched, out, only=["convert"])
    assert e.value.exit_code == 4
    assert not (out / "convert" / "DONE").exists()


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_parity_figures_per_lora_mode(tiny_model_dir, tmp_path, mode):
    """merged: the trained forward is the deployed one (exact); unmerged: close but not exact."""
    out = tmp_path / mode
    recipe = tiny_recipe(tiny_model_dir, f"qat.lora={mode}", "train.lr=0.05", "convert.parity_min_sqnr=0")
    run_recipe(recipe, out, only=["finetune", "convert"])
    parity = json.loads((out / "convert" / "parity.json").read_text())
    a = parity["as_trained_vs_converted"]["sqnr_db"]
    assert parity["fake_quant_merged_vs_converted"]["sqnr_db"] == float("inf")
    assert parity["reloaded_vs_in_memory"]["max_abs_diff"] == 0
    if mode == "merged":
        assert a == float("inf")
    else:
        assert 0 < a < float("inf")


def test_parity_gate_fails_when_trained_forward_is_not_the_deployed_one(tiny_model_dir, tmp_path):
    """unmerged LoRA with a large update: q(W + s·BA) drifts from fq(W) + s·BA -> gate, exit 4, no DONE."""
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_model_dir, "qat.lora=unmerged", "train.lr=0.05", "convert.parity_min_sqnr=60")
    with pytest.raises(GateError, match="parity gate failed") as e:
        run_recipe(recipe, out, only=["finetune", "convert"])
    assert e.value.exit_code == 4
    assert not (out / "convert" / "DONE").exists()
    assert json.loads((out / "manifest.json").read_text())["parity"]["as_trained_vs_converted"]["sqnr_db"] < 60


@pytest.mark.parametrize("scheme", ["int8-int4", "int8", "w4-channel"])
def test_merged_lora_forward_is_exact_and_its_gradient_straight_through(tiny_model_dir, scheme):
    """merged mode: y = fq(W + s·BA) x bit for bit; LoRA gradients are the straight-through ones, computed
    without a full-size weight gradient."""
    import torch.nn.functional as F

    from qatkit.backends.hf import attach_lora, prepare_for_qat
    from qatkit.loading import load_model_and_tokenizer

    recipe = tiny_recipe(tiny_model_dir, f"qat.scheme={scheme}")
    model, _ = load_model_and_tokenizer(recipe.model)
    prepare_for_qat(recipe, model)
    model = attach_lora(recipe, model)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    base, a, b = layer.get_base_layer(), layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    torch.manual_seed(0)
    with torch.no_grad():
        b.normal_(std=0.05)
    x = torch.randn(2, 7, base.in_features)

    y = layer(x)
    y.square().sum().backward()
    grads = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None

    xq = base.activation_fake_quantizer(x) if base.activation_fake_quantizer is not None else x
    merged = base.weight + (b @ a) * s
    with torch.no_grad():
        assert torch.equal(y, F.linear(xq, base.weight_fake_quantizer(merged)))
    ste = merged + (base.weight_fake_quantizer(merged) - merged).detach()
    F.linear(xq, ste).square().sum().backward()
    for got, want in zip(grads, (a.grad, b.grad), strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_lm_head_can_be_left_unquantized(tiny_model_dir, tmp_path):
    """qat.quantize_lm_head: false keeps lm_head out of QAT, convert and the PTQ baseline alike."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run_recipe(tiny_recipe(tiny_model_dir, "qat.quantize_lm_head=false"), out, only=["finetune", "convert"])
    plan = json.loads((out / "finetune" / "qat_plan.json").read_text())
    assert "lm_head" not in plan["signature"] and any(k.endswith("down_proj") for k in plan["signature"])
    assert json.loads((out / "convert" / "parity.json").read_text())["as_trained_vs_converted"]["sqnr_db"] == float(
        "inf"
    )
    model = AutoModelForCausalLM.from_pretrained(out / "convert")
    assert type(model.lm_head.weight.data) is torch.Tensor
    assert type(model.model.layers[0].mlp.down_proj.weight).__name__ != "Parameter"
