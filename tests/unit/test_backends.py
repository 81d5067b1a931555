"""Backend selection and the Unsloth backend's checks (Unsloth itself needs CUDA; these run anywhere).

torch is imported inside the tests that need it, so collecting this module stays light.
"""

import importlib.util
import subprocess
import sys

import pytest

from qatkit.backends.base import backend_name
from qatkit.backends.support import check_unsloth_recipe
from qatkit.backends.unsloth import entry_point
from qatkit.core.errors import EnvError, RecipeError
from qatkit.recipe import DistillSpec, TrainSpec, validate_recipe

from ..conftest import DATA, TINY_RECIPE, run_cli

UNSLOTH_INSTALLED = importlib.util.find_spec("unsloth") is not None


def recipe(backend="auto", scheme="int4", lora="unmerged", **qat):
    return validate_recipe(
        {
            "name": "t",
            "model": {"name_or_path": "Qwen/Qwen3-8B"},
            "backend": backend,
            "qat": {"scheme": scheme, "lora": lora, **qat},
            "data": {"path": str(DATA)},
        }
    )


@pytest.mark.skipif(UNSLOTH_INSTALLED, reason="unsloth is installed here")
def test_backend_unsloth_without_unsloth_is_an_environment_error():
    with pytest.raises(EnvError, match=r"backend: unsloth requested but unsloth is not installed") as e:
        backend_name(recipe("unsloth"))
    assert e.value.exit_code == 3
    assert "pip install 'qatkit[unsloth]'" in str(e.value) and "backend: hf" in str(e.value)


@pytest.mark.skipif(UNSLOTH_INSTALLED, reason="unsloth is installed here")
def test_backend_selection_does_not_import_torch():
    code = """
import sys
from qatkit.backends.base import backend_name
from qatkit.core.errors import EnvError
from qatkit.recipe import validate_recipe
def r(b):
    return validate_recipe({"name": "t", "model": {"name_or_path": "a/b"}, "backend": b, "qat": {"scheme": "int4"},
                            "stages": ["convert"]})
out = [backend_name(r("auto")), backend_name(r("hf"))]
try:
    backend_name(r("unsloth"))
except EnvError as e:
    out.append(str(e.exit_code))
print(*out, "torch" in sys.modules)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["hf", "hf", "3", "False"]


@pytest.mark.skipif(UNSLOTH_INSTALLED, reason="unsloth is installed here")
def test_cli_finetune_with_backend_unsloth_exits_3(tiny_model_dir, tmp_path):
    res = run_cli(
        "finetune",
        str(TINY_RECIPE),
        "--out",
        str(tmp_path / "run"),
        "--set",
        f"model.name_or_path={tiny_model_dir}",
        "--set",
        "backend=unsloth",
    )
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-2000:]
    assert "unsloth is not installed" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "finetune" / "DONE").exists()


def test_unsloth_entry_point_per_family():
    # FastLanguageModel patches these itself; others (Gemma-3, multimodal, MoE) must use FastModel or
    # FastLanguageModel.get_peft_model drops qat_scheme
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"):
        assert entry_point(model_type) == "FastLanguageModel", model_type
    for model_type in ("gemma3", "gemma3_text", "qwen3_moe", "mistral3", "llama4"):
        assert entry_point(model_type) == "FastModel", model_type


def test_unsloth_refuses_what_it_cannot_train_faithfully():
    check_unsloth_recipe(recipe("unsloth", "int4", "unmerged"))  # the cards
    check_unsloth_recipe(recipe("unsloth", "int8", "unmerged"))
    with pytest.raises(RecipeError, match=r"qat\.lora: unmerged") as e:
        check_unsloth_recipe(recipe("unsloth", "int4", "merged"))
    assert e.value.exit_code == 2
    # int8-int4 fake-quantizes lm_head, which Unsloth's fused loss bypasses
    with pytest.raises(RecipeError, match="lm_head"):
        check_unsloth_recipe(recipe("unsloth", "int8-int4", "unmerged"))
    with pytest.raises(RecipeError, match="learn_scales"):
        check_unsloth_recipe(recipe("unsloth", "w4-channel", "unmerged", learn_scales=True))
    # the GGUF grids are qatkit's own fake quantizer, which Unsloth's torchao qat_scheme cannot apply
    for scheme in ("q4_0", "q8_0"):
        with pytest.raises(RecipeError, match=r"own weight fake quantizer.*backend: hf"):
            check_unsloth_recipe(recipe("unsloth", scheme, "unmerged"))
    full = recipe("unsloth", "int8", "unmerged").model_copy(update={"train": TrainSpec(full_finetuning=True)})
    with pytest.raises(RecipeError, match="full_finetuning"):
        check_unsloth_recipe(full)
    distilled = recipe("unsloth", "int8", "unmerged").model_copy(update={"distill": DistillSpec(teacher="base")})
    with pytest.raises(RecipeError, match="distill"):
        check_unsloth_recipe(distilled)
    with pytest.raises(RecipeError, match="init_from"):
        check_unsloth_recipe(recipe("unsloth", "int8", "unmerged", init_from="control"))
    with pytest.raises(RecipeError, match=r"qat\.awq"):
        check_unsloth_recipe(recipe("unsloth", "int8", "unmerged", awq={}))


def _tiny_lora_model(r=16):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qatkit.testing import tiny_config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("qwen3", tie=False), dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=r, target_modules=targets))


def _prepare_like_unsloth(model, rules, hook=None):
    """unsloth/models/_utils.py `_prepare_model_for_qat` with a TorchAOConfig: the hook, then one quantize_ per rule."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    if hook is not None:
        hook(model)
    for base_config, filter_fn in rules:
        quantize_(model, QATConfig(base_config, step="prepare"), filter_fn=filter_fn)


def test_unsloth_qat_rules_train_exactly_what_convert_rebuilds():
    """The TorchAOConfig rules handed to Unsloth fake-quantize the same modules, with the same configs, as the
    hf-side rebuild in the convert stage; LoRA A/B and lm_head stay unquantized."""
    import torch
    from transformers import AutoModelForCausalLM

    from qatkit.backends.unsloth import qat_rules, verify_fake_quant
    from qatkit.quant.apply import prepare
    from qatkit.quant.patches import fake_quantizers, signature
    from qatkit.quant.spec import QuantSpec
    from qatkit.testing import tiny_config

    r = recipe("unsloth", "int4", "unmerged")
    model = _tiny_lora_model()
    rules, hook, state = qat_rules(r)
    _prepare_like_unsloth(model, rules, hook)
    trained = verify_fake_quant(model, state["plan"])

    torch.manual_seed(0)
    rebuilt = AutoModelForCausalLM.from_config(tiny_config("qwen3", tie=False), dtype=torch.float32)
    prepare(rebuilt, QuantSpec.named("int4"))
    assert trained == signature(rebuilt)  # what convert.check_same_quantizers compares
    assert len(trained) == 2 * 7
    fq = fake_quantizers(model)
    assert all(fqn.endswith(".base_layer") for fqn in fq), sorted(fq)[:3]
    assert {w for _, w in fq.values()} == {"Int4WeightFakeQuantizer"}


def test_unsloth_fake_quant_check_catches_dropped_and_foreign_quantizers():
    import torch

    from qatkit.backends.unsloth import qat_rules, verify_fake_quant
    from qatkit.quant.patches import fake_quantizers

    r = recipe("unsloth", "int4", "unmerged")
    # qat_scheme silently dropped: LoRA but no fake quantizer at all
    model = _tiny_lora_model()
    rules, hook, state = qat_rules(r)
    hook(model)
    with pytest.raises(EnvError, match="without any fake quantizer") as e:
        verify_fake_quant(model, state["plan"])
    assert e.value.exit_code == 3
    # Unsloth's own qat_scheme="int4" filter (every Linear with in_features >= 128): LoRA A and lm_head too
    model = _tiny_lora_model()
    rules, hook, state = qat_rules(r)
    hook(model)
    unsloth_int4 = [(rules[0][0], lambda m, _: isinstance(m, torch.nn.Linear) and m.in_features >= 128)]
    _prepare_like_unsloth(model, unsloth_int4)
    assert any("lora_A" in fqn for fqn in fake_quantizers(model))
    with pytest.raises(EnvError, match="other modules than qatkit planned"):
        verify_fake_quant(model, state["plan"])
