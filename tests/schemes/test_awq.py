"""qat.awq: QAT starting from AWQ's channel scaling of each gated MLP, on the tiny model."""

import json

import pytest
import torch

from qatkit.core.errors import RecipeError
from qatkit.pipeline import run_recipe
from qatkit.recipe import load_recipe

from ..conftest import TINY_RECIPE


def _prepared(model_dir, scheme):
    from qatkit.models.loading import load_model_and_tokenizer
    from qatkit.quant.apply import prepare
    from qatkit.quant.spec import QuantSpec

    recipe = load_recipe(TINY_RECIPE, [f"model.name_or_path={model_dir}"])
    model, _ = load_model_and_tokenizer(recipe.model)
    spec = QuantSpec.resolve(scheme, learn_scales=True)
    prepare(model, spec)
    return model.eval(), spec


def _down_proj_inputs(model, ids, mask):
    """Each MLP's down_proj input rows (real tokens) with all fake quantization off."""
    from qatkit.quant.awq import gated_mlps
    from qatkit.quant.patches import each_fake_quantizer

    inputs, hooks = {}, []
    for name, mlp in gated_mlps(model).items():
        hook = (lambda n: lambda module, args, out: inputs.__setitem__(n, args[0][mask.bool()]))(name)
        hooks.append(mlp.down_proj.register_forward_hook(hook))
    quantizers = [fq for _, _, fq in each_fake_quantizer(model)]
    with torch.no_grad():
        for fq in quantizers:
            fq.enabled = False
        logits = model(input_ids=ids, attention_mask=mask).logits
        for fq in quantizers:
            fq.enabled = True
    for h in hooks:
        h.remove()
    return inputs, logits


@pytest.mark.parametrize("scheme", ["int8-int4", "w4-channel", "q4_0"])
def test_awq_keeps_the_model_and_lowers_down_projs_quantized_error(tiny_model_dir, scheme):
    """Unquantized, the scaled model computes what the original did; quantized, each down_proj's output error on
    the calibration tokens is at most what it was unscaled; the saved scales rebuild the same weights."""
    from qatkit.quant.awq import awq_, gated_mlps, load_awq_scales, save_awq_scales

    model, spec = _prepared(tiny_model_dir, scheme)
    ids = torch.randint(3, model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-2:, 12:] = 0
    inputs, logits = _down_proj_inputs(model, ids, mask)
    mlps = gated_mlps(model)
    originals = {n: m.down_proj.weight.detach().clone() for n, m in mlps.items()}
    with torch.no_grad():
        unscaled = {n: (m.down_proj(inputs[n]) - inputs[n] @ originals[n].T).pow(2).mean() for n, m in mlps.items()}

    scales = awq_(model, ids, mask, spec.group_size, grid=10)
    assert set(scales) == set(mlps)
    assert any(not torch.equal(s, torch.ones_like(s)) for s in scales.values())  # the search scaled something
    scaled_inputs, scaled_logits = _down_proj_inputs(model, ids, mask)
    torch.testing.assert_close(scaled_logits, logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for name, mlp in mlps.items():
            s = scales[name]
            torch.testing.assert_close(scaled_inputs[name] * s, inputs[name], rtol=1e-4, atol=1e-5)
            err = (mlp.down_proj(scaled_inputs[name]) - inputs[name] @ originals[name].T).pow(2).mean()
            assert err <= unscaled[name] * (1 + 1e-4)

    fresh, _ = _prepared(tiny_model_dir, scheme)
    save_awq_scales(scales, tiny_model_dir.parent / f"awq-{scheme}.safetensors")
    load_awq_scales(fresh, tiny_model_dir.parent / f"awq-{scheme}.safetensors")
    for name, mlp in gated_mlps(fresh).items():
        assert torch.equal(mlp.down_proj.weight, mlps[name].down_proj.weight)
        assert torch.equal(mlp.up_proj.weight, mlps[name].up_proj.weight)


def test_qat_from_awq_converts_to_the_model_it_trained(tiny_model_dir, tmp_path):
    """The adapter was trained on the scaled MLPs: convert rescales a fresh base from the file beside it, so the
    converted checkpoint is exactly the trained forward; without that file convert refuses."""
    out = tmp_path / "run"
    recipe = load_recipe(
        TINY_RECIPE,
        [
            f"model.name_or_path={tiny_model_dir}",
            "train.max_steps=2",
            "train.lr=0.01",
            "qat.learn_scales=true",
            "qat.awq.samples=4",
            "qat.awq.max_tokens=32",
        ],
    )
    run_recipe(recipe, out, only=["finetune", "convert"])
    parity = json.loads((out / "convert" / "parity.json").read_text())
    assert parity["as_trained_vs_converted"]["sqnr_db"] == float("inf")

    (out / "finetune" / "adapter" / "awq_scales.safetensors").unlink()
    (out / "convert" / "DONE").unlink()
    with pytest.raises(RecipeError, match=r"awq_scales\.safetensors is missing"):
        run_recipe(recipe, out, only=["convert"])
