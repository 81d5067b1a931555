from qatkit.report.model_card import _how_trained


def _paragraph(general: dict) -> str:
    recipe = {"qat": {"lora": "merged"}, "train": {}, "distill": {"teacher": "base", "general": general}}
    return _how_trained({"scheme": "int8-int4"}, recipe, "SmolLM2-135M")[0]


def test_the_card_names_every_general_text_source():
    mixed = _paragraph({"path": "pkg:a/boolq.jsonl", "mix": [{"path": "pkg:a/quac.jsonl"}, {"path": "b.jsonl"}]})
    assert "general text beside the task (`pkg:a/boolq.jsonl`, `pkg:a/quac.jsonl`, `b.jsonl`)" in mixed
    assert "(sequences the teacher sampled itself)" in _paragraph({"path": "teacher"})
