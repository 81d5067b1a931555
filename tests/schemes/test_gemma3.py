"""A tiny multimodal Gemma-3 (Gemma3ForConditionalGeneration with a SigLIP vision tower) through the hf backend.

qatkit fine-tunes on text only: the vision tower gets neither LoRA adapters nor fake quantizers and must come
out of finetune + convert bit-identical, while the language model is trained, converted and reloads. Gemma's
pitfalls: the tied lm_head (untied before int8-int4 quantizes it) and the scaled input embedding
(`Gemma3TextScaledWordEmbedding`, kept in high precision so `embed_scale` survives).
"""

import json
from pathlib import Path

import pytest
import torch

from qatkit.core.errors import RecipeError
from qatkit.pipeline import run_recipe
from qatkit.quant.patches import fake_quantizers
from qatkit.quant.plan import OUTSIDE_LANGUAGE_MODEL
from qatkit.recipe import load_recipe

from ..conftest import TINY_RECIPE, arith_texts

VISION = ("model.vision_tower.", "model.multi_modal_projector.")


def build_tiny_gemma3_vlm(out: Path) -> Path:
    """Gemma3ForConditionalGeneration from config: the tiny Gemma-3 text model plus a 1-layer SigLIP tower."""
    from transformers import AutoModelForCausalLM, Gemma3Config, SiglipVisionConfig

    from qatkit.testing import tiny_config, train_tokenizer

    tokenizer = train_tokenizer(arith_texts())
    text = tiny_config("gemma3_text", vocab_size=len(tokenizer))
    text.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text.pad_token_id = tokenizer.pad_token_id
    vision = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory) -> Path:
    return build_tiny_gemma3_vlm(tmp_path_factory.mktemp("tiny-gemma3-vlm"))


def gemma_recipe(model_dir, *overrides):
    # w4-intx: the cards' int4 converts only on CUDA; w4-intx is the 4-bit weight-only scheme that converts on CPU
    return load_recipe(
        TINY_RECIPE,
        [
            f"model.name_or_path={model_dir}",
            "qat.scheme=w4-intx",
            "train.max_steps=2",
            "train.batch_size=4",
            *overrides,
        ],
    )


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def vision_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(VISION)}


def test_plan_keeps_the_vision_tower_out(gemma3_dir):
    from qatkit.validate import validate

    v = validate(gemma_recipe(gemma3_dir))  # meta-device model, like `qatkit validate`
    outside = [m for m in v.plan.modules if m.fqn.startswith(VISION)]
    assert outside and all(not m.quantize and m.reason == OUTSIDE_LANGUAGE_MODEL for m in outside)
    assert {m.fqn.split(".layers.")[0] for m in v.plan.quantized} == {"model.language_model"}
    assert len(v.plan.quantized) == 2 * 7  # every language-model projection; lm_head is not in w4-intx


def test_lora_targets_only_in_the_vision_tower_are_refused(gemma3_dir):
    from qatkit.validate import validate

    with pytest.raises(RecipeError, match="'out_proj' matches no layer of the language model"):
        validate(gemma_recipe(gemma3_dir, "lora.target_modules=[q_proj,out_proj]"))  # SigLIP's attention output


def test_text_only_qat_leaves_the_vision_tower_bit_identical(gemma3_dir, tmp_path):
    out = tmp_path / "run"
    run_recipe(gemma_recipe(gemma3_dir), out, only=["finetune", "convert"])

    trained = json.loads((out / "finetune" / "qat_plan.json").read_text())
    assert trained["signature"] and not any(k.startswith(VISION) for k in trained["signature"])
    assert all(trained["skipped"][k] == OUTSIDE_LANGUAGE_MODEL for k in trained["skipped"] if k.startswith(VISION))
    from safetensors.torch import load_file

    adapter = load_file(out / "finetune" / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * 2 and all(".language_model.layers." in k for k in adapter)
    losses = json.loads((out / "finetune" / "loss.json").read_text())
    assert len(losses) == 2

    original, converted = load(gemma3_dir), load(out / "convert")
    assert type(converted).__name__ == "Gemma3ForConditionalGeneration"
    before, after = vision_state(original), vision_state(converted)
    assert before.keys() == after.keys() and len(before) > 10
    for key in before:
        assert type(after[key]) is torch.Tensor and torch.equal(before[key], after[key]), key
    lm = converted.model.language_model
    assert type(lm.layers[0].mlp.down_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(lm.embed_tokens).__name__ == "Gemma3TextScaledWordEmbedding"
    assert lm.embed_tokens.embed_scale.item() == pytest.approx(128**0.5)
    parity = json.loads((out / "convert" / "parity.json").read_text())
    assert parity["as_trained_vs_converted"]["sqnr_db"] == float("inf")  # merged LoRA: trained forward = deployed
    assert parity["reloaded_vs_in_memory"]["max_abs_diff"] == 0


def test_int8_int4_ptq_unties_lm_head_and_keeps_the_scaled_embedding(gemma3_dir, tmp_path):
    out = tmp_path / "ptq"
    recipe = gemma_recipe(gemma3_dir, "qat.scheme=int8-int4", "stages=[convert]")
    run_recipe(recipe, out, only=["convert"])
    original, converted = load(gemma3_dir), load(out / "convert")
    assert converted.config.get_text_config().tie_word_embeddings is False
    assert type(converted.lm_head.weight).__name__ == "IntxUnpackedToInt8Tensor"
    emb = converted.model.language_model.embed_tokens
    assert type(emb).__name__ == "Gemma3TextScaledWordEmbedding" and type(emb.weight) is torch.nn.Parameter
    assert torch.equal(emb.weight, original.model.language_model.embed_tokens.weight)
    for key, value in vision_state(original).items():
        assert torch.equal(value, vision_state(converted)[key]), key
    parity = json.loads((out / "convert" / "parity.json").read_text())
    assert parity["reloaded_vs_in_memory"]["max_abs_diff"] == 0
    assert parity["fake_quant_merged_vs_converted"]["max_abs_diff"] == 0


def test_unsloth_fastmodel_rules_skip_the_vision_tower(gemma3_dir):
    """The TorchAOConfig rules the unsloth backend hands to FastModel.get_peft_model on a LoRA-wrapped Gemma-3."""
    from peft import LoraConfig, get_peft_model
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    from qatkit.backends.unsloth import qat_rules, verify_fake_quant

    model = load(gemma3_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, target_modules=targets))  # no exclusion: vision q/k/v get LoRA
    rules, hook, state = qat_rules(gemma_recipe(gemma3_dir, "qat.lora=unmerged"))
    hook(model)
    for base_config, filter_fn in rules:
        quantize_(model, QATConfig(base_config, step="prepare"), filter_fn=filter_fn)
    signature = verify_fake_quant(model, state["plan"])
    assert len(signature) == 2 * 7 and all(k.startswith("model.language_model.") for k in signature)
    assert not any("vision_tower" in fqn for fqn in fake_quantizers(model))
