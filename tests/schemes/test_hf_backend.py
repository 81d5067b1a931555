"""The hf backend through the real pipeline (SFTTrainer, peft, torchao) on the tiny model."""

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
    import json

    out = tmp_path / mode
    run_recipe(tiny_recipe(tiny_model_dir, f"qat.lora={mode}", "train.lr=0.05"), out, only=["finetune", "convert"])
    parity = json.loads((out / "convert" / "parity.json").read_text())
    a = parity["as_trained_vs_converted"]["sqnr_db"]
    assert parity["fake_quant_merged_vs_converted"]["sqnr_db"] == float("inf")
    assert parity["reloaded_vs_in_memory"]["max_abs_diff"] == 0
    if mode == "merged":
        assert a == float("inf")
    else:
        assert 20 < a < float("inf")
