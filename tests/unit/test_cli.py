import subprocess
import sys

import pytest

from ..conftest import run_cli


def test_help_does_not_import_heavy_libraries():
    heavy = "{'torch', 'transformers', 'torchao', 'unsloth', 'lm_eval', 'peft', 'trl'}"
    code = f"import sys; from qatkit.cli import app; app(['--help'], standalone_mode=False); print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_every_command_has_help_with_an_example():
    for cmd in ("run", "finetune", "convert", "eval", "validate", "schemes", "report", "export", "generate"):
        out = run_cli(cmd, "--help")
        assert out.returncode == 0, out.stderr
        assert "Example" in out.stdout, cmd


def test_missing_recipe_exits_2():
    out = run_cli("validate", "does/not/exist.yaml")
    assert out.returncode == 2
    assert "recipe file not found" in out.stderr
    assert "Traceback" not in out.stderr


def test_eval_without_tasks_exits_2(tmp_path):
    out = run_cli("eval", str(tmp_path), "--tasks", ",")
    assert out.returncode == 2 and "--tasks: name at least one lm-eval task" in out.stderr, out.stderr


def test_unknown_key_exits_2_with_suggestion(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: x\nmodel: {name_or_path: a/b}\nqat: {scheme: int8}\ndata: {path: x.jsonl}\ntrian: {max_steps: 2}\n"
    )
    out = run_cli("validate", str(recipe))
    assert out.returncode == 2
    assert "did you mean 'train'" in out.stderr


def test_schemes_lists_every_registered_scheme():
    from qatkit.quant.registry import list_schemes

    out = run_cli("schemes")
    assert out.returncode == 0
    for s in list_schemes():
        assert s.name in out.stdout


def test_output_cut_short_by_the_reader_is_not_an_internal_error():
    """`qatkit schemes | head -1`: the reader is gone before the output is written; rich exits 1 quietly, qatkit
    adds no 'internal error' (a pipe whose read end is already closed makes every write fail, as it would)."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "qatkit", "schemes"], stdout=write_end, stderr=subprocess.PIPE, timeout=120
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 1
    assert b"internal error" not in proc.stderr, proc.stderr.decode()


def test_num_processes_is_stripped_from_the_relaunched_command_line():
    from qatkit.core.distributed import strip_num_processes

    argv = ["run", "r.yaml", "--num-processes", "2", "--set", "a=1", "--num-processes=3", "--resume"]
    assert strip_num_processes(argv) == ["run", "r.yaml", "--set", "a=1", "--resume"]


def test_num_processes_refused_inside_a_launched_process(monkeypatch):
    from qatkit.core.distributed import launch
    from qatkit.core.errors import RecipeError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="already running under a multi-process launcher"):
        launch(["run", "r.yaml"], 2)
