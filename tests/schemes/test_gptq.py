"""qat.gptq: QAT starting from GPTQ weights on the learned scales' grid (int8-int4), on the tiny model."""

import json

import pytest
import torch

from qatkit.core.errors import RecipeError
from qatkit.pipeline import run_recipe
from qatkit.recipe import load_recipe

from ..conftest import TINY_RECIPE, send_sigterm, stopped_early

SAMPLED = ("q_proj", "gate_proj")


def _prepared(model_dir, scale_init):
    from qatkit.models.loading import load_model_and_tokenizer
    from qatkit.quant.apply import prepare
    from qatkit.quant.spec import QuantSpec

    recipe = load_recipe(TINY_RECIPE, [f"model.name_or_path={model_dir}"])
    model, _ = load_model_and_tokenizer(recipe.model)
    prepare(model, QuantSpec.resolve("int8-int4", learn_scales=True, scale_init=scale_init))
    return model.eval()


def _calibration(model, rows=6, width=24):
    ids = torch.randint(3, model.config.vocab_size, (rows, width), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-2:, width // 2 :] = 0  # right padding: left out of the Hessians
    return ids, mask


def _first_layer_inputs(model, ids, mask, names):
    """The inputs of the first layer's sampled linears with their weight fake quantizers off (what GPTQ sees)."""
    layer = model.model.layers[0]
    inputs = {}

    def keep(name):
        def hook(module, args, output):
            inputs[name] = args[0][mask.bool()]

        return hook

    hooks = [layer.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    with torch.no_grad():
        for n in names:
            layer.get_submodule(n).weight_fake_quantizer.enabled = False
        model(input_ids=ids, attention_mask=mask)
        for n in names:
            layer.get_submodule(n).weight_fake_quantizer.enabled = True
    for h in hooks:
        h.remove()
    return inputs


@pytest.mark.parametrize("scale_init", ["absmax", "mse"])
def test_gptq_weights_are_on_the_grid_and_beat_round_to_nearest(tiny_model_dir, scale_init):
    """The fake quantizer maps every GPTQ weight to itself (training starts exactly from the GPTQ model), and on
    the first layer, whose inputs GPTQ and round-to-nearest share, GPTQ's output error is the smaller."""
    from qatkit.quant.gptq import gptq_

    model = _prepared(tiny_model_dir, scale_init)
    ids, mask = _calibration(model)
    layer = model.model.layers[0]
    names = [n for n, _ in layer.named_modules() if n.endswith(SAMPLED)]
    inputs = _first_layer_inputs(model, ids, mask, names)
    original = {n: layer.get_submodule(n).weight.detach().clone() for n in names}
    with torch.no_grad():
        rtn = {n: layer.get_submodule(n).weight_fake_quantizer(w) for n, w in original.items()}

    changed = gptq_(model, ids, mask)

    assert "lm_head" in changed and len(changed) == 7 * len(model.model.layers) + 1
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in changed:
                assert torch.equal(module.weight_fake_quantizer(module.weight), module.weight), name
        for n, w in original.items():
            x, gptq = inputs[n], layer.get_submodule(n).weight
            assert not torch.equal(gptq, rtn[n])
            assert (x @ (gptq - w).T).pow(2).sum() < (x @ (rtn[n] - w).T).pow(2).sum(), n


def test_gptq_of_lm_head_only_keeps_the_decoder_at_round_to_nearest(tiny_model_dir):
    """targets="lm_head": the decoder's weights are untouched and lm_head gets GPTQ weights on its grid, whose
    output error on what the fake-quantized decoder feeds it is below round-to-nearest's."""
    from qatkit.quant.gptq import gptq_

    model = _prepared(tiny_model_dir, "mse")
    ids, mask = _calibration(model)
    decoder_before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    head = model.lm_head
    original = head.weight.detach().clone()
    with torch.no_grad():
        x = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
        rtn = head.weight_fake_quantizer(original)

    assert gptq_(model, ids, mask, targets="lm_head") == ["lm_head"]
    assert all(torch.equal(p, decoder_before[n]) for n, p in model.model.named_parameters())
    with torch.no_grad():
        assert torch.equal(head.weight_fake_quantizer(head.weight), head.weight)
        assert (x @ (head.weight - original).T).pow(2).sum() < (x @ (rtn - original).T).pow(2).sum()


def test_qat_from_gptq_converts_to_the_model_it_trained(tiny_model_dir, tmp_path):
    """The adapter was trained on the GPTQ weights: convert rebuilds them from the file beside it, so the converted
    checkpoint is exactly the trained forward; without that file convert refuses."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    recipe = load_recipe(
        TINY_RECIPE,
        [
            f"model.name_or_path={tiny_model_dir}",
            "train.max_steps=2",
            "train.lr=0.01",
            "qat.learn_scales=true",
            "qat.gptq.samples=4",
            "qat.gptq.max_tokens=32",
        ],
    )
    run_recipe(recipe, out, only=["finetune", "convert"])
    saved = load_file(out / "finetune" / "adapter" / "gptq_weights.safetensors")
    assert saved["lm_head.q"].dtype == torch.int8 and int(saved["lm_head.q"].abs().max()) <= 8
    parity = json.loads((out / "convert" / "parity.json").read_text())
    assert parity["as_trained_vs_converted"]["sqnr_db"] == float("inf")
    assert parity["fake_quant_merged_vs_converted"]["sqnr_db"] == float("inf")

    (out / "finetune" / "adapter" / "gptq_weights.safetensors").unlink()
    (out / "convert" / "DONE").unlink()
    with pytest.raises(RecipeError, match=r"gptq_weights\.safetensors is missing"):
        run_recipe(recipe, out, only=["convert"])


def test_a_stop_request_ends_gptq_at_the_next_layer(tiny_model_dir, monkeypatch):
    """Ctrl-C or SIGTERM during GPTQ: it ends before the next decoder layer with Interrupted instead of going
    through every layer first."""
    from qatkit.quant import gptq

    model = _prepared(tiny_model_dir, "absmax")
    ids, mask = _calibration(model)
    last = model.model.layers[-1].mlp.down_proj.weight.detach().clone()
    quantize, quantized = gptq._quantize_linears, []

    def stopped_in_the_first(linears, *args):
        quantized.append(list(linears))
        if len(quantized) == 1:
            send_sigterm()
        return quantize(linears, *args)

    monkeypatch.setattr(gptq, "_quantize_linears", stopped_in_the_first)
    with stopped_early("GPTQ"):
        gptq.gptq_(model, ids, mask)
    assert len(quantized) == 1 and all(name.startswith("model.layers.0.") for name in quantized[0])
    assert torch.equal(model.model.layers[-1].mlp.down_proj.weight, last)  # the last layer was never quantized
