import json

import pytest

from qatkit.core.errors import RecipeError
from qatkit.recipe import validate_recipe
from qatkit.run.rundir import RunDir, open_run_dir

RECIPE = validate_recipe(
    {"name": "t", "model": {"name_or_path": "m/m"}, "qat": {"scheme": "int8"}, "data": {"path": "x.jsonl"}}
)


def test_failed_stage_leaves_nothing_that_looks_finished(tmp_path):
    run = open_run_dir(tmp_path / "run", RECIPE, resume=False, force=False)
    with pytest.raises(RuntimeError), run.atomic_stage("convert", resume=False) as work:
        (work / "model.safetensors").write_text("half")
        raise RuntimeError("killed")
    assert not run.is_done("convert")
    assert not run.stage("convert").exists()
    assert run.manifest()["stages"]["convert"]["status"] == "failed"


def test_finished_stage_is_renamed_then_marked_done(tmp_path):
    run = open_run_dir(tmp_path / "run", RECIPE, resume=False, force=False)
    with run.atomic_stage("convert", resume=False) as work:
        (work / "x").write_text("1")
    assert (run.stage("convert") / "x").read_text() == "1"
    assert run.is_done("convert") and not run.partial("convert").exists()
    stage = run.manifest()["stages"]["convert"]
    assert stage["status"] == "done" and stage["seconds"] >= 0 and stage["peak_memory"]["cpu_rss_mb"] > 0


def test_rerun_without_resume_wipes_partial_state(tmp_path):
    run = RunDir(tmp_path)
    run.partial("finetune").mkdir()
    (run.partial("finetune") / "stale").write_text("x")
    with run.atomic_stage("finetune", resume=False) as work:
        assert not (work / "stale").exists()


def test_resume_keeps_partial_state(tmp_path):
    run = RunDir(tmp_path)
    run.partial("finetune").mkdir()
    (run.partial("finetune") / "checkpoint").write_text("x")
    with run.atomic_stage("finetune", resume=True) as work:
        assert (work / "checkpoint").exists()


def test_existing_out_dir_needs_force_or_resume(tmp_path):
    out = tmp_path / "run"
    open_run_dir(out, RECIPE, resume=False, force=False)
    with pytest.raises(RecipeError, match=r"--resume .* --force"):
        open_run_dir(out, RECIPE, resume=False, force=False)
    open_run_dir(out, RECIPE, resume=True, force=False)
    (out / "junk").write_text("x")
    open_run_dir(out, RECIPE, resume=False, force=True)
    assert not (out / "junk").exists()


def test_manifest_records_recipe_hash_and_versions(tmp_path):
    run = open_run_dir(tmp_path / "run", RECIPE, resume=False, force=False)
    m = json.loads(run.manifest_path.read_text())
    assert m["recipe_hash"] == RECIPE.digest() and m["versions"]["qatkit"]
    assert (run.root / "recipe.resolved.yaml").exists()


def test_resume_refuses_a_changed_recipe(tmp_path):
    out = tmp_path / "run"
    open_run_dir(out, RECIPE, resume=False, force=False)
    changed = RECIPE.model_copy(update={"name": "other", "train": RECIPE.train.model_copy(update={"lr": 1e-3})})
    with pytest.raises(RecipeError, match="recipe changed") as e:
        open_run_dir(out, changed, resume=True, force=False)
    assert f"(name: {RECIPE.name!r} → 'other'; train.lr: {RECIPE.train.lr!r} → 0.001)" in str(e.value)
    open_run_dir(out, RECIPE.model_copy(update={"stages": ["finetune"]}), resume=True, force=False)  # not a change


def test_resume_survives_a_qatkit_upgrade(tmp_path):
    """A run dir from an older qatkit (another hash formula, no entry for a newer setting) resumes."""
    out = tmp_path / "run"
    run = open_run_dir(out, RECIPE, resume=False, force=False)
    manifest = json.loads(run.manifest_path.read_text())
    del manifest["recipe"]["train"]["full_finetuning"]
    run.manifest_path.write_text(json.dumps({**manifest, "recipe_hash": "0123456789abcdef"}))
    open_run_dir(out, RECIPE, resume=True, force=False)
    manifest["recipe"]["name"] = "other"
    run.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RecipeError, match="recipe changed"):
        open_run_dir(out, RECIPE, resume=True, force=False)


def test_resume_skips_a_checkpoint_killed_while_being_written(tmp_path):
    from qatkit.run.layout import last_checkpoint

    assert last_checkpoint(tmp_path / "none") is None
    state = '{"global_step": 0}'
    written = {
        4: {"trainer_state.json": state, "extra.bin": "x"},
        8: {"trainer_state.json": state},
        12: {"model.bin": "x"},
        16: {"model.bin": "x", "trainer_state.json": state[:9]},  # killed inside the Trainer's write of its state
    }
    for step, files in written.items():
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        for name, text in files.items():
            (ckpt / name).write_text(text)
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-8"  # 12 lacks the trainer state, 16 has half of it
    assert last_checkpoint(tmp_path, ("extra.bin",)) == tmp_path / "checkpoint-4"


def test_a_file_written_atomically_is_whole_or_as_it_was(tmp_path):
    from qatkit.core.io import atomic_file

    path = tmp_path / "scales.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_file(path) as tmp:
        tmp.write_bytes(b"half of the n")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]
    with atomic_file(path) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and list(tmp_path.iterdir()) == [path]


def test_cache_keys_change_with_the_code_that_computes_them(tmp_path):
    from qatkit.core.cache import code_fingerprint, source_digest

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "schemes.py").write_text("GROUP = 32\n")
    (tmp_path / "notes.md").write_text("not code")
    before = source_digest(tmp_path)
    (tmp_path / "notes.md").write_text("edited, still not code")
    assert source_digest(tmp_path) == before
    (tmp_path / "pkg" / "schemes.py").write_text("GROUP = 64\n")
    assert source_digest(tmp_path) != before
    (tmp_path / "pkg" / "schemes.py").write_text("GROUP = 32\n")
    assert source_digest(tmp_path) == before
    fingerprint = code_fingerprint()
    assert len(fingerprint["qatkit_source"]) == 20 and fingerprint["torchao"]


def test_gguf_cache_key_changes_with_the_file_and_the_dequantizer_versions(tmp_path, monkeypatch):
    from importlib import metadata

    from qatkit.models.loading import gguf_cache_key

    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + b"\1" * 64)
    key = gguf_cache_key(gguf)
    assert key.startswith("m.Q4_1-") and gguf_cache_key(gguf) == key
    gguf.write_bytes(b"GGUF" + b"\2" * 64)
    assert gguf_cache_key(gguf) != key
    gguf.write_bytes(b"GGUF" + b"\1" * 64)
    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.0.1" if name == "gguf" else real_version(name))
    assert gguf_cache_key(gguf) != key


def test_the_manifest_records_every_data_source_and_its_held_out_items(tmp_path):
    from qatkit.pipeline import prepare_data

    from ..conftest import DATA

    other = tmp_path / "other.jsonl"
    other.write_text(
        "".join(line.replace('"question": "', '"question": "other ') + "\n" for line in DATA.read_text().splitlines())
    )
    data = {
        "path": str(DATA),
        "eval_size": 10,
        "train_size": 40,
        "mix": [{"path": str(other), "eval_size": 30, "train_size": 20}],
    }
    recipe = validate_recipe({**RECIPE.model_dump(exclude_defaults=True), "data": data})
    run = open_run_dir(tmp_path / "run", recipe, resume=False, force=False)
    info = prepare_data(recipe, run)
    assert run.manifest()["data"]["source"] == f"{DATA} + {other}"
    assert info["eval_sources"] == [{"path": str(DATA), "eval_rows": 10}, {"path": str(other), "eval_rows": 30}]
    assert (info["train_rows"], info["eval_rows"]) == (60, 40)
    held_out = (run.root / "data" / "eval.jsonl").read_text().splitlines()
    assert ["other " in line for line in held_out] == [False] * 10 + [True] * 30
