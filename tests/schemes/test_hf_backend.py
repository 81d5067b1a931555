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
