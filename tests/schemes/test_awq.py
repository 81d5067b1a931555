"""qat.awq: QAT starting from AWQ's channel scaling of each gated MLP, on the tiny model."""

import json
import shutil

import pytest
import torch

from qatkit.core.errors import RecipeError
from qatkit.pipeline import run_recipe
from qatkit.recipe import load_recipe

from ..conftest import TINY_RECIPE, arith_texts, send_sigterm, stopped_early


def _prepared(model_dir, scheme, random_norms=False):
    """The model QAT-prepared for `scheme` (learned scales); random_norms: every norm weight drawn at random (seeded)
    instead of the init's constant, so a wrong norm rescaling shows."""
    from qatkit.models.loading import load_model_and_tokenizer
    from qatkit.quant.apply import prepare
    from qatkit.quant.spec import QuantSpec

    recipe = load_recipe(TINY_RECIPE, [f"model.name_or_path={model_dir}"])
    model, _ = load_model_and_tokenizer(recipe.model)
    if random_norms:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
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


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory):
    from qatkit.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-gemma3"), arith_texts(), arch="gemma3_text")


def _mlp_inputs_and_logits(model, ids, mask):
    """Each MLP's input rows (real tokens) and the logits, with all fake quantization off."""
    from qatkit.quant.awq import gated_mlps
    from qatkit.quant.patches import each_fake_quantizer, fake_quant_off

    inputs, hooks = {}, []
    for name, mlp in gated_mlps(model).items():
        hook = (lambda n: lambda module, args: inputs.__setitem__(n, args[0][mask.bool()]))(name)
        hooks.append(mlp.register_forward_pre_hook(hook))
    with torch.no_grad(), fake_quant_off(fq for _, _, fq in each_fake_quantizer(model)):
        logits = model(input_ids=ids, attention_mask=mask).logits
    for h in hooks:
        h.remove()
    return inputs, logits


def _mlp_error_with_gate_up_quantized(mlp, x, want):
    from qatkit.quant.patches import each_fake_quantizer, fake_quant_off

    with torch.no_grad(), fake_quant_off(fq for _, _, fq in each_fake_quantizer(mlp.down_proj)):
        return (mlp(x) - want).pow(2).mean()


@pytest.mark.parametrize(
    ("arch", "scheme", "channels"),
    [
        ("llama", "int8-int4", ["mlp_input"]),
        ("gemma3_text", "q4_0", ["mlp_input"]),
        ("gemma3_text", "q4_0", ["mlp_input", "mlp_hidden"]),
    ],
)
def test_awq_mlp_input_keeps_the_model_and_lowers_the_mlps_quantized_error(
    tiny_model_dir, tiny_gemma3_dir, arch, scheme, channels
):
    """gate/up_proj's inputs times s, the norm before the MLP divided by it (Gemma's 1 + w included): unquantized,
    the same model; with gate/up_proj quantized, each MLP's output error at most what it was; the saved scales
    rebuild the same weights, norms included."""
    from qatkit.quant.awq import awq_, gated_mlps, load_awq_scales, mlp_input_norm, save_awq_scales
    from qatkit.quant.patches import each_fake_quantizer, fake_quant_off

    model_dir = tiny_gemma3_dir if arch == "gemma3_text" else tiny_model_dir
    model, spec = _prepared(model_dir, scheme, random_norms=True)
    ids = torch.randint(3, model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-2:, 12:] = 0
    inputs, logits = _mlp_inputs_and_logits(model, ids, mask)
    mlps = gated_mlps(model)
    with torch.no_grad(), fake_quant_off(fq for _, _, fq in each_fake_quantizer(model)):
        exact = {n: m(inputs[n]) for n, m in mlps.items()}
    unscaled = {n: _mlp_error_with_gate_up_quantized(m, inputs[n], exact[n]) for n, m in mlps.items()}

    scales = awq_(model, ids, mask, spec.group_size, grid=10, channels=channels)
    norm_keys = {mlp_input_norm(model, n)[0] for n in mlps}
    assert set(scales) == norm_keys | (set(mlps) if "mlp_hidden" in channels else set())
    assert any(not torch.equal(scales[k], torch.ones_like(scales[k])) for k in norm_keys)
    scaled_inputs, scaled_logits = _mlp_inputs_and_logits(model, ids, mask)
    torch.testing.assert_close(scaled_logits, logits, rtol=1e-4, atol=1e-4)
    for name, mlp in mlps.items():
        s = scales[mlp_input_norm(model, name)[0]]
        torch.testing.assert_close(scaled_inputs[name] * s, inputs[name], rtol=1e-4, atol=1e-5)
        if channels == ["mlp_input"]:
            assert _mlp_error_with_gate_up_quantized(mlp, scaled_inputs[name], exact[name]) <= unscaled[name] * (
                1 + 1e-4
            )

    fresh, _ = _prepared(model_dir, scheme, random_norms=True)
    path = model_dir.parent / f"awq-{arch}-{'-'.join(channels)}.safetensors"
    save_awq_scales(scales, path)
    load_awq_scales(fresh, path, channels)
    trained = dict(model.named_parameters())
    differ = [n for n, p in fresh.named_parameters() if n.endswith(".weight") and not torch.equal(p, trained[n])]
    assert differ == []  # learned scales are not compared: a run loads its trained ones after the AWQ scales
    with pytest.raises(RecipeError, match="other modules"):
        load_awq_scales(fresh, path, ["mlp_hidden"])


@pytest.mark.parametrize(
    ("channels", "start"),
    [
        ("[mlp_hidden]", "base"),
        ("[mlp_input,mlp_hidden]", "base"),
        ("[mlp_hidden]", "control"),
        ("[mlp_input,mlp_hidden]", "control-merged"),
    ],
)
def test_qat_from_awq_converts_to_the_model_it_trained(tiny_model_dir, tmp_path, channels, start):
    """The adapter was trained on the scaled MLPs (and norms): convert rescales a fresh base from the file beside it,
    so the converted checkpoint is exactly the trained forward (also when QAT started from the control's adapter,
    scaled alike, or from the control merged into the weights); without that file convert refuses, and so it does
    without the control's adapter that the merged start keeps beside."""
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
            f"qat.awq.channels={channels}",
            f"qat.init_from={start}",
        ],
    )
    run_recipe(recipe, out, only=["finetune", "convert"])
    parity = json.loads((out / "convert" / "parity.json").read_text())
    assert parity["as_trained_vs_converted"]["sqnr_db"] == float("inf")

    (out / "finetune" / "adapter" / "awq_scales.safetensors").unlink()
    (out / "convert" / "DONE").unlink()
    with pytest.raises(RecipeError, match=r"awq_scales\.safetensors is missing"):
        run_recipe(recipe, out, only=["convert"])
    if start == "control-merged":
        shutil.rmtree(out / "finetune" / "adapter" / "control_adapter")
        with pytest.raises(RecipeError, match="control_adapter is missing"):
            run_recipe(recipe, out, only=["convert"])


@pytest.mark.parametrize(
    ("channels", "start"),
    [("[mlp_hidden]", "control"), ("[mlp_input,mlp_hidden]", "control"), ("[mlp_input,mlp_hidden]", "control-merged")],
)
def test_qat_from_awq_and_the_control_starts_as_the_control(tiny_model_dir, tmp_path, channels, start):
    """qat.awq with qat.init_from: control: the search runs on the control (its adapter merged), and the control's
    adapter is scaled with the weights, so unquantized the QAT model starts as the control computes; the scales
    are the ones the search picks on the control, not on the base. control-merged: the same from the merged weights
    and a new adapter (zero at the start), the control's adapter kept beside it."""
    from safetensors.torch import load_file

    from qatkit.backends.hf import HFBackend, _calibration_batch
    from qatkit.backends.trainer import train_and_save
    from qatkit.data import load_splits, training_examples
    from qatkit.models.assembly import attach_lora, load_finetuned, load_trained
    from qatkit.models.loading import load_model_and_tokenizer
    from qatkit.quant.apply import prepare
    from qatkit.quant.awq import awq_
    from qatkit.quant.patches import each_fake_quantizer, fake_quant_off

    overrides = ["qat.learn_scales=true", "qat.awq.samples=4", "qat.awq.max_tokens=32", f"qat.awq.channels={channels}"]
    recipe = load_recipe(TINY_RECIPE, [f"model.name_or_path={tiny_model_dir}", f"qat.init_from={start}", *overrides])
    control = tmp_path / "control"
    base, _ = load_model_and_tokenizer(recipe.model)
    torch.manual_seed(0)
    with_adapter = attach_lora(recipe, base)
    with torch.no_grad():
        for name, p in with_adapter.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)  # a control far from the base
    with_adapter.save_pretrained(control)

    examples = training_examples(load_splits(recipe.data), recipe.data.answer_style)
    trainer, model, tokenizer = HFBackend().trainer(recipe, examples, tmp_path / "work", False, True, control)
    ids = torch.randint(3, model.config.vocab_size, (4, 20), generator=torch.Generator().manual_seed(0))
    want, _ = load_finetuned(recipe, control)
    with torch.no_grad(), fake_quant_off(fq for _, _, fq in each_fake_quantizer(model)):
        torch.testing.assert_close(model(ids).logits, want(ids).logits, rtol=1e-4, atol=1e-4)

    new_adapter = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert new_adapter and all((p.abs().max() == 0) == (start == "control-merged") for p in new_adapter.values())
    kept = tmp_path / "work" / "adapter" / "control_adapter" / "adapter_model.safetensors"
    assert kept.is_file() == (start == "control-merged")
    saved = load_file(str(tmp_path / "work" / "adapter" / "awq_scales.safetensors"))
    assert any(not torch.equal(s, torch.ones_like(s)) for s in saved.values())  # the search scaled something
    batch = _calibration_batch(recipe, recipe.qat.awq, examples, load_model_and_tokenizer(recipe.model)[1])

    def search(start):
        prepare(start, recipe.quant)
        spec = recipe.qat.awq
        ids, mask = batch["input_ids"], batch["attention_mask"]
        return awq_(start, ids, mask, recipe.quant.group_size, spec.grid, False, spec.channels)

    on_control, on_base = search(load_finetuned(recipe, control)[0]), search(load_model_and_tokenizer(recipe.model)[0])
    assert all(torch.equal(saved[k], on_control[k]) for k in saved)
    assert any(not torch.equal(saved[k], on_base[k]) for k in saved)

    # trained, the model rebuilds from what the run saved with every weight, adapter and scale as trained (the
    # base weights: the control merged in, or not); the trainer's own forward runs under its autocast
    train_and_save(trainer, model, tokenizer, tmp_path / "work", tmp_path / "work" / "adapter", False, 0.0)
    rebuilt = load_trained(recipe, tmp_path / "work" / "adapter")[0]
    state, trained = rebuilt.state_dict(), model.state_dict()
    assert state.keys() == trained.keys()
    assert [k for k in state if not torch.equal(state[k], trained[k])] == []


def test_a_checkpoint_loads_with_the_awq_scales_its_run_started_from(tiny_model_dir, tmp_path):
    """Trainer checkpoints hold the adapter and learned scales, not the AWQ scales the run started from (they sit
    beside the fine-tune's adapter): load_checkpoint puts them back, so a checkpoint of the trained state rebuilds
    the model as trained; without them it cannot be rebuilt. The finished adapter folder, which holds them, loads too."""
    import shutil

    from qatkit.models.assembly import load_checkpoint, load_trained
    from qatkit.run.layout import AWQ_SCALES, RunLayout

    overrides = ["train.max_steps=2", "train.lr=0.01", "qat.learn_scales=true", "qat.awq.samples=4"]
    recipe = load_recipe(TINY_RECIPE, [f"model.name_or_path={tiny_model_dir}", "qat.awq.max_tokens=32", *overrides])
    run_recipe(recipe, tmp_path / "run", only=["finetune"])
    trained = tmp_path / "run" / "finetune" / "adapter"
    checkpoint = tmp_path / "checkpoint-2"  # what a checkpoint of the last step holds
    shutil.copytree(trained, checkpoint, ignore=shutil.ignore_patterns(AWQ_SCALES))

    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_trained(recipe, trained)[0].eval()(ids).logits
        got = load_checkpoint(recipe, RunLayout(tmp_path / "run"), checkpoint)[0].eval()(ids).logits
        finished = load_checkpoint(recipe, RunLayout(tmp_path / "run"), trained)[0].eval()(ids).logits
    assert torch.equal(got, want) and torch.equal(finished, want)
    assert not (checkpoint / AWQ_SCALES).exists()
    with pytest.raises(RecipeError, match=r"awq_scales\.safetensors is missing"):
        load_trained(recipe, checkpoint)


def test_a_stop_request_ends_the_search_at_the_next_mlp(tiny_model_dir, monkeypatch):
    """Ctrl-C or SIGTERM while AWQ searches: the search ends before the next MLP with Interrupted instead of going
    through every layer first."""
    from qatkit.quant import awq

    model, spec = _prepared(tiny_model_dir, "int8-int4")
    ids = torch.randint(3, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    last = model.model.layers[-1].mlp.down_proj.weight.detach().clone()
    search, searched = awq._search, []

    def stopped_in_the_first(*args):
        searched.append(args[3])
        if len(searched) == 1:
            send_sigterm()
        return search(*args)

    monkeypatch.setattr(awq, "_search", stopped_in_the_first)
    with stopped_early("AWQ"):
        awq.awq_(model, ids, torch.ones_like(ids), spec.group_size, grid=10)
    assert searched == ["model.layers.0.mlp"]
    assert torch.equal(model.model.layers[-1].mlp.down_proj.weight, last)  # the last MLP was never searched
