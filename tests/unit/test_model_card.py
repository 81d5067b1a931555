from qatkit.report.model_card import _how_trained


def _paragraph(general: dict) -> str:
    recipe = {"qat": {"lora": "merged"}, "train": {}, "distill": {"teacher": "base", "general": general}}
    return _how_trained({"scheme": "int8-int4"}, recipe, "SmolLM2-135M")[0]


def test_the_card_names_every_general_text_source():
    mixed = _paragraph({"path": "pkg:a/boolq.jsonl", "mix": [{"path": "pkg:a/quac.jsonl"}, {"path": "b.jsonl"}]})
    assert "general text beside the task (`pkg:a/boolq.jsonl`, `pkg:a/quac.jsonl`, `b.jsonl`)" in mixed
    assert "(sequences the teacher sampled itself)" in _paragraph({"path": "teacher"})


def test_the_card_says_qat_started_from_awq_scaling_and_of_which_channels():
    recipe = {"qat": {"lora": "merged", "awq": {"channels": ["mlp_input", "mlp_hidden"]}}, "train": {}}
    card = _how_trained({"scheme": "q4_0"}, recipe, "Gemma 3 270M")[0]
    assert "starting from AWQ's activation-aware scaling of the MLPs' input and hidden channels" in card
    recipe["qat"]["awq"] = {"samples": 64, "max_tokens": 256, "grid": 20}  # from before qat.awq.channels: hidden only
    assert "of the MLPs' hidden channels" in _how_trained({"scheme": "q4_0"}, recipe, "Gemma 3 270M")[0]


def test_the_card_says_when_scales_were_learned_in_log_space():
    recipe = {"qat": {"lora": "merged", "learn_scales": True}, "train": {}}
    linear = _how_trained({"scheme": "q4_0"}, recipe, "Gemma 3 270M")[0]
    assert "weight scales learned too" in linear and "log space" not in linear
    recipe["qat"]["scale_space"] = "log"
    assert "weight scales learned too (stepped in log space)" in _how_trained({"scheme": "q4_0"}, recipe, "Gemma")[0]
