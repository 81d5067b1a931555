"""validate / eval / convert --from through the real CLI on the tiny model."""

import json
import re

from ..conftest import DATA, TINY_RECIPE, run_cli


def test_validate_lists_the_plan_and_size(tiny_model_dir):
    res = run_cli("validate", str(TINY_RECIPE), "--set", f"model.name_or_path={tiny_model_dir}")
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())
    assert "recipe is valid" in out
    assert "linear q_proj" in out and "fake-quantize" in out
    assert "embedding embed_tokens" in out  # int8-int4 quantizes the input embedding too
    assert "untied" in out
    assert "Estimated checkpoint size" in out


def test_validate_lists_skipped_modules_with_reason(tiny_model_dir):
    res = run_cli(
        "validate",
        str(TINY_RECIPE),
        "--set",
        f"model.name_or_path={tiny_model_dir}",
        "--set",
        "qat.scheme=w4-intx",
        "--set",
        "qat.group_size=256",
    )
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())
    assert "skip" in out and "group size" in out and "256" in out


def test_eval_offline_preflight_fails_before_loading_the_model(tiny_model_dir, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "ghost.yaml").write_text(
        "task: ghost\ndataset_path: qatkit-nonexistent/ghost-dataset\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n"
    )
    res = run_cli("eval", str(tiny_model_dir), "--tasks", "ghost", "--include-path", str(tasks))
    assert res.returncode == 3, res.stderr
    assert "ghost" in res.stderr and "--include-path" in " ".join(res.stderr.split())
    assert "Loading weights" not in res.stderr  # nothing was loaded


def test_convert_from_a_model_dir_is_ptq(tiny_model_dir, tmp_path):
    out = tmp_path / "ptq"
    res = run_cli("convert", "--from", str(tiny_model_dir), "--scheme", "8da4w", "--out", str(out))
    assert res.returncode == 0, res.stderr
    parity = json.loads((out / "convert" / "parity.json").read_text())
    assert parity["as_trained_vs_converted"] is None  # nothing was trained
    assert parity["fake_quant_merged_vs_converted"]["sqnr_db"] == float("inf")
    assert parity["reloaded_vs_in_memory"]["max_abs_diff"] == 0
    cfg = json.loads((out / "convert" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "torchao" and cfg["tie_word_embeddings"] is False


def test_tokenizer_without_chat_template(tiny_model_dir, tmp_path):
    """GGUF tokenizers often have no chat template: a clear exit 2, and model.chat_template supplies one."""
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").unlink()
    args = [
        "run",
        str(TINY_RECIPE),
        "--set",
        f"model.name_or_path={model}",
        "--set",
        "train.max_steps=1",
        "--set",
        "stages=[finetune]",
    ]
    res = run_cli(*args, "--out", str(tmp_path / "a"))
    assert res.returncode == 2 and "model.chat_template" in res.stderr, res.stderr[-2000:]
    res = run_cli(*args, "--out", str(tmp_path / "b"), "--set", "model.chat_template=chatml")
    assert res.returncode == 0, res.stderr[-2000:]


def test_max_seq_length_that_cuts_off_answers(tiny_model_dir, tmp_path):
    """TRL drops the examples whose answer max_length truncates away: some is a warning with the count, all is a
    clear exit 2 (not a crash in the trainer's sampler)."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:60]
    for row in rows[:20]:
        row["question"] = " ".join([row["question"]] * 8)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["run", str(TINY_RECIPE), "--set", f"model.name_or_path={tiny_model_dir}", "--set", f"data.path={data}"]
    args += ["--set", "data.eval_size=10", "--set", "train.max_steps=1", "--set", "stages=[finetune]"]

    res = run_cli(*args, "--set", "model.max_seq_length=64", "--out", str(tmp_path / "some"))
    assert res.returncode == 0, res.stderr[-2000:]
    dropped = re.search(r"(\d+) of 50 training examples dropped", " ".join(res.stderr.split()))
    assert dropped and 1 <= int(dropped.group(1)) <= 20, res.stderr[-2000:]

    res = run_cli(*args, "--set", "model.max_seq_length=16", "--out", str(tmp_path / "all"))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "model.max_seq_length 16 cuts off the answer of every training example" in " ".join(res.stderr.split())


def test_conversations_train_on_every_assistant_reply(tiny_model_dir, tmp_path):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:40]
    turns = [("system", "Add the numbers.")]
    chats = []
    for first, second in zip(rows[::2], rows[1::2], strict=True):
        for row in (first, second):
            turns += [("human", row["question"]), ("gpt", row["choices"][row["answer"]])]
        chats.append({"conversations": [{"from": who, "value": text} for who, text in turns]})
        turns = turns[:1]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    out = tmp_path / "run"
    res = run_cli(
        "run",
        str(TINY_RECIPE),
        *("--set", f"model.name_or_path={tiny_model_dir}", "--set", f"data.path={data}", "--set", "data.format=auto"),
        *("--set", "data.train_size=null", "--set", "train.max_steps=3", "--set", "stages=[finetune]"),
        *("--out", str(out)),
    )
    assert res.returncode == 0, res.stderr[-2000:]

    train = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 40  # both replies of each of the 20 conversations, each once
    by_turn = sorted(len(example["prompt"]) for example in train)
    assert by_turn == [2] * 20 + [4] * 20  # system + question, then + reply + next question
    assert all(example["completion"][0]["role"] == "assistant" for example in train)
    assert len(json.loads((out / "finetune" / "loss.json").read_text())) == 3


def test_one_stage_commands_continue_one_run(tiny_model_dir, tmp_path):
    """`qatkit finetune`, then `qatkit convert` on the same run dir converts the fine-tuned model (not a PTQ of the
    original); convert before finetune, or a stage the recipe lacks, is refused before anything is written."""
    out = tmp_path / "run"
    args = [str(TINY_RECIPE), "--set", f"model.name_or_path={tiny_model_dir}", "--set", "train.max_steps=3"]
    res = run_cli("convert", *args, "--out", str(out))
    assert res.returncode == 2 and "convert needs a finished finetune stage" in " ".join(res.stderr.split())
    res = run_cli("finetune", *args, "--set", "stages=[convert,eval]", "--out", str(out))
    assert res.returncode == 2 and "the recipe has no finetune stage" in res.stderr, res.stderr[-2000:]
    assert not out.exists()

    assert run_cli("finetune", *args, "--out", str(out)).returncode == 0
    assert (out / "finetune" / "DONE").exists() and not (out / "convert").exists()
    res = run_cli("convert", *args, "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    parity = json.loads((out / "convert" / "parity.json").read_text())
    assert parity["as_trained_vs_converted"]["sqnr_db"] == float("inf")  # compared with the model as trained
