"""qatkit pack / unpack: a run directory cut into committable parts and rebuilt byte for byte elsewhere."""

import json

import pytest

from qatkit.core.errors import RecipeError
from qatkit.run.state import MANIFEST, PART, pack, unpack


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _run_dir(root):
    """A run mid-training: two complete checkpoints and one being written, a lock, a file twice over."""
    files = {
        "manifest.json": b"{}",
        "data/train.jsonl": b'{"text": "a"}\n' * 50,
        ".finetune.partial/control/adapter/adapter_model.safetensors": bytes(range(256)) * 40,
        ".finetune.partial/adapter/control_adapter/adapter_model.safetensors": bytes(range(256)) * 40,
        ".finetune.partial/adapter/awq_scales.safetensors": b"s" * 300,
        ".finetune.partial/checkpoints/checkpoint-50/trainer_state.json": b"{}",
        ".finetune.partial/checkpoints/checkpoint-50/learned_scales.safetensors": b"old" * 100,
        ".finetune.partial/checkpoints/checkpoint-100/trainer_state.json": b'{"step": 100}',
        ".finetune.partial/checkpoints/checkpoint-100/learned_scales.safetensors": b"new" * 100,
        ".finetune.partial/checkpoints/checkpoint-100/optimizer.pt": b"o" * 5000,
        ".finetune.partial/checkpoints/checkpoint-150/trainer_state.json": b"{}",  # scales not written yet
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "cache.lock").write_text("")
    return files


def test_pack_keeps_the_last_complete_checkpoint_and_unpacks_byte_for_byte(tmp_path):
    run = tmp_path / "run"
    files = _run_dir(run)
    manifest = pack(run, tmp_path / "state", part_bytes=4096)
    parts = sorted((tmp_path / "state").glob("part-*.bin"))
    assert len(parts) == manifest["parts"] > 1 and all(p.stat().st_size <= 4096 for p in parts)
    duplicate = ".finetune.partial/adapter/control_adapter/adapter_model.safetensors"
    stored = sum(p.stat().st_size for p in parts)
    assert stored == sum(f["bytes"] for f in manifest["files"]) - len(files[duplicate])  # stored once

    unpack(tmp_path / "state", tmp_path / "elsewhere")
    kept = {k: v for k, v in files.items() if "checkpoint-50/" not in k and "checkpoint-150/" not in k}
    assert _files(tmp_path / "elsewhere") == kept


def _finished_run(root):
    """A `bench recovery --out` folder: one scheme's run with its fine-tune and convert finished, eval under way."""
    files = {
        "recovery.json": b"{}",
        "int8-int4-merged/manifest.json": b"{}",
        "int8-int4-merged/finetune/DONE": b"",
        "int8-int4-merged/finetune/adapter/adapter_model.safetensors": bytes(range(256)) * 40,
        "int8-int4-merged/convert/DONE": b"",
        "int8-int4-merged/convert/model.safetensors": b"m" * 9000,
        "int8-int4-merged/.eval.partial/variants/qat.json": b'{"text_nll": 3.4}',
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


@pytest.mark.parametrize("keep_converted", [False, True])
def test_the_converted_checkpoint_of_a_finished_fine_tune_is_left_for_resume_to_rebuild(tmp_path, keep_converted):
    run = tmp_path / "run"
    files = _finished_run(run)
    manifest = pack(run, tmp_path / "state", part_bytes=4096, keep_converted=keep_converted)
    unpack(tmp_path / "state", tmp_path / "elsewhere")
    if keep_converted:
        assert manifest["left_out"] == [] and _files(tmp_path / "elsewhere") == files
    else:
        assert manifest["left_out"] == ["int8-int4-merged/convert"]
        assert _files(tmp_path / "elsewhere") == {k: v for k, v in files.items() if "/convert/" not in k}


def test_a_conversion_is_kept_while_its_fine_tune_is_unfinished(tmp_path):
    run = tmp_path / "run"
    files = _finished_run(run)
    (run / "int8-int4-merged/finetune/DONE").unlink()
    assert pack(run, tmp_path / "state")["left_out"] == []
    unpack(tmp_path / "state", tmp_path / "elsewhere")
    assert _files(tmp_path / "elsewhere") == {k: v for k, v in files.items() if k != "int8-int4-merged/finetune/DONE"}


def test_pack_and_unpack_refuse_what_they_would_damage(tmp_path):
    run = tmp_path / "run"
    _run_dir(run)
    with pytest.raises(RecipeError, match="not a qatkit run directory"):
        pack(run / "data", tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(RecipeError, match="not empty"):
        pack(run, tmp_path / "full")
    pack(run, tmp_path / "state", part_bytes=4096)
    with pytest.raises(RecipeError, match="exists"):
        unpack(tmp_path / "state", run)
    with pytest.raises(RecipeError, match=r"no state\.json"):
        unpack(tmp_path / "full", tmp_path / "new")


@pytest.mark.parametrize("damage", ["flip", "cut", "drop"])
def test_a_damaged_part_is_caught_and_leaves_nothing_behind(tmp_path, damage):
    run = tmp_path / "run"
    _run_dir(run)
    manifest = pack(run, tmp_path / "state", part_bytes=4096)
    part = tmp_path / "state" / PART.format(manifest["parts"] - 1)
    data = part.read_bytes()
    if damage == "flip":
        part.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    elif damage == "cut":
        part.write_bytes(data[:-1])
    else:
        part.unlink()
    with pytest.raises(RecipeError, match=r"sha256|end inside|missing"):
        unpack(tmp_path / "state", tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists() and not list(tmp_path.glob(".elsewhere*"))
    assert json.loads((tmp_path / "state" / MANIFEST).read_text())["format"] == 1
