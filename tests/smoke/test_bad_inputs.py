"""Bad input, table-driven: every case fails before any model loads, with one clear line and its exit code."""

import importlib.util
import json

import pytest
import yaml
from typer.testing import CliRunner

from qatkit.cli import app

from ..conftest import DATA


@pytest.fixture
def make_recipe(tmp_path, tiny_model_dir):
    def make(mutate=None, text: str | None = None) -> str:
        path = tmp_path / "recipe.yaml"
        if text is not None:
            path.write_text(text)
            return str(path)
        recipe = {
            "name": "bad",
            "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
            "backend": "hf",
            "qat": {"scheme": "int8-int4"},
            "data": {"path": str(DATA), "format": "mmlu", "eval_size": 10},
            "train": {"max_steps": 2},
            "eval": {"tasks": ["heldout"]},
        }
        if mutate:
            mutate(recipe, tmp_path)
        path.write_text(yaml.safe_dump(recipe))
        return str(path)

    return make


def _set(section, key, value):
    def mutate(r, _):
        r.setdefault(section, {})[key] = value

    return mutate


def _data_file(content: str, fmt: str = "mmlu"):
    def mutate(r, tmp):
        (tmp / "d.jsonl").write_text(content)
        r["data"].update(path=str(tmp / "d.jsonl"), format=fmt)

    return mutate


def _task_dir(yaml_text: str):
    def mutate(r, tmp):
        (tmp / "tasks").mkdir(exist_ok=True)
        (tmp / "tasks" / "ghost.yaml").write_text(yaml_text)
        r["eval"] = {"tasks": ["ghost"], "include_path": str(tmp / "tasks")}

    return mutate


def _gguf(content: bytes):
    def mutate(r, tmp):
        (tmp / "m.gguf").write_bytes(content)
        r["model"]["name_or_path"] = str(tmp / "m.gguf")

    return mutate


GHOST_LOCAL = (
    "task: ghost\ndataset_path: json\ndataset_kwargs: {data_files: {test: /nonexistent/ghost.jsonl}}\n"
    "test_split: test\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n"
)
GHOST_HUB = GHOST_LOCAL.replace(
    "dataset_path: json\ndataset_kwargs: {data_files: {test: /nonexistent/ghost.jsonl}}\n",
    "dataset_path: qatkit-nonexistent/ghost-dataset\n",
)

CASES = [
    # (id, mutate, extra CLI args, exit code, message fragment)
    ("unknown-top-key", _set("trian", "max_steps", 3), [], 2, "did you mean 'train'"),
    ("unknown-nested-key", _set("lora", "rank", 8), [], 2, "lora.rank: unknown key (did you mean 'r'?)"),
    ("wrong-type", _set("train", "batch_size", "eight"), [], 2, "train.batch_size"),
    ("zero-steps", _set("train", "max_steps", 0), [], 2, "train.max_steps"),
    ("negative-lr", _set("train", "lr", -0.001), [], 2, "train.lr"),
    ("unknown-optimizer", _set("train", "optim", "adamw_bogus"), [], 2, "train.optim: unknown 'adamw_bogus'"),
    ("unknown-scheduler", _set("train", "lr_scheduler", "cosine_bogus"), [], 2, "did you mean 'cosine'"),
    ("lora-rank-zero", _set("lora", "r", 0), [], 2, "lora.r"),
    ("unknown-scheme", _set("qat", "scheme", "int9"), [], 2, "unknown scheme 'int9'"),
    (
        "lora-target-misspelt",  # peft would silently skip it: the other entries match
        _set("lora", "target_modules", ["q_prj", "v_proj"]),
        [],
        2,
        "'q_prj' matches no layer of the language model (did you mean 'q_proj'?)",
    ),
    ("lora-target-lm-head", _set("lora", "target_modules", ["q_proj", "lm_head"]), [], 2, "'lm_head' is the output"),
    ("lora-target-not-linear", _set("lora", "target_modules", ["mlp"]), [], 2, "'mlp' names LlamaMLP modules"),
    (
        "group-size-divides-no-layer",
        _set("qat", "group_size", 48),
        [],
        2,
        "scheme int8-int4 quantizes no linear layer of this model: 13 × in_features 128 not a multiple of group size 48",
    ),
    ("merged-lora-with-dropout", _set("lora", "dropout", 0.1), [], 2, "lora.dropout: 0"),
    ("bad-stage-order", lambda r, _: r.update(stages=["convert", "finetune"]), [], 2, "order"),
    ("scheme-not-convertible-here", _set("qat", "scheme", "int4"), [], 3, "int4 convert needs a CUDA GPU"),
    ("fp8-not-convertible-here", _set("qat", "scheme", "fp8-fp8"), [], 3, "on CPU use int8"),
    ("unsloth-without-cuda", lambda r, _: r.update(backend="unsloth"), [], 3, "backend: unsloth requested"),
    ("no-eval-tasks", _set("eval", "tasks", []), [], 2, "eval.tasks: List should have at least 1 item"),
    ("unknown-task", _set("eval", "tasks", ["no_such_task_xyz"]), [], 2, "unknown lm-eval task"),
    ("task-local-data-missing", _task_dir(GHOST_LOCAL), [], 3, "not available"),
    ("task-hub-data-offline", _task_dir(GHOST_HUB), [], 3, "not available"),
    ("data-missing", _set("data", "path", "/nonexistent/data.jsonl"), [], 2, "data file not found"),
    ("data-empty", _data_file(""), [], 2, "empty"),
    (
        "data-malformed-json",
        _data_file('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{oops\n'),
        [],
        2,
        "malformed JSON",
    ),
    (
        "data-malformed-row",
        _data_file(json.dumps({"question": "q", "choices": ["a"], "answer": "x"}) + "\n"),
        [],
        2,
        "row 1",
    ),
    (
        "heldout-without-mc-items",
        _data_file(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\n", "prompt-completion"),
        [],
        2,
        "'heldout' scores held-out multiple-choice items",
    ),
    ("data-unknown-format", _data_file(json.dumps({"text": "hello"}) + "\n", "auto"), [], 2, "data.format"),
    ("eval-size-too-large", _set("data", "eval_size", 10_000), [], 2, "data.eval_size"),
    ("model-path-missing", _set("model", "name_or_path", "/nonexistent/model"), [], 2, "does not exist"),
    ("model-dir-without-config", lambda r, tmp: r["model"].update(name_or_path=str(tmp)), [], 2, "no config.json"),
    ("gguf-unreadable", _gguf(b"NOTGGUF" + b"\0" * 64), [], 2, "not a GGUF file"),
    (
        "hub-model-not-cached",
        _set("model", "name_or_path", "qatkit-nonexistent/model-xyz"),
        [],
        3,
        "must be downloaded first",
    ),
    (
        "package-not-installed",
        _set("model", "name_or_path", "pkg:qatkit_no_such_pkg/m.gguf"),
        [],
        3,
        "is not installed",
    ),
    ("override-without-equals", None, ["--set", "train.max_steps"], 2, "key.path=value"),
    ("override-unknown-key", None, ["--set", "train.max_step=3"], 2, "did you mean 'max_steps'"),
]


@pytest.mark.parametrize(("case", "mutate", "args", "code", "fragment"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_input(make_recipe, tmp_path, case, mutate, args, code, fragment, command, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    extra = ["--out", str(tmp_path / "out")] if command == "run" else []
    result = CliRunner().invoke(app, [command, make_recipe(mutate), *extra, *args])
    output = result.output

    assert result.exit_code == code, output
    assert fragment in " ".join(output.split()), output
    assert "Traceback" not in output
    assert not (tmp_path / "out").exists(), "nothing may be written before validation passes"


@pytest.mark.parametrize(
    ("case", "text", "fragment"),
    [("not-yaml", "name: [unclosed\n", "invalid YAML"), ("not-a-mapping", "- a\n- b\n", "mapping")],
)
def test_bad_recipe_file(make_recipe, case, text, fragment):
    result = CliRunner().invoke(app, ["validate", make_recipe(text=text)])
    assert result.exit_code == 2 and fragment in result.output


def test_missing_recipe_file(tmp_path):
    result = CliRunner().invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "recipe file not found" in result.output


def test_unsupported_library_version_is_refused(make_recipe, monkeypatch):
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.9.0" if name == "torchao" else real(name))
    result = CliRunner().invoke(app, ["validate", make_recipe()])
    assert result.exit_code == 3
    assert "torchao 0.9.0 is not supported" in result.output


def test_optimizer_whose_package_is_missing_is_an_environment_error(make_recipe):
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    result = CliRunner().invoke(app, ["validate", make_recipe(_set("train", "optim", "adamw_8bit"))])
    assert result.exit_code == 3 and "install `bitsandbytes`" in " ".join(result.output.split()), result.output


def test_resume_on_a_directory_that_is_not_a_run(make_recipe, tmp_path):
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "file").write_text("x")
    result = CliRunner().invoke(app, ["run", make_recipe(), "--out", str(tmp_path / "notarun"), "--resume"])
    assert result.exit_code == 2 and "not a qatkit run dir" in result.output


def test_scheme_that_cannot_convert_here_is_fine_for_finetune_only(make_recipe):
    recipe = make_recipe(lambda r, _: (r["qat"].update(scheme="int4"), r.update(stages=["finetune"])))
    result = CliRunner().invoke(app, ["validate", recipe])
    assert result.exit_code == 0, result.output
