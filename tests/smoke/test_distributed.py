"""Two-process CPU DDP (gloo) through `qatkit run --num-processes 2` (accelerate's launcher).

The loss must match a single-process run with the same global batch, only the main process writes,
and convert/eval run once on a checkpoint that loads without qatkit.
"""

import json

import pytest

from ..conftest import TINY_RECIPE, run_cli


def _run(out, model_dir, *extra):
    return run_cli(
        "run", str(TINY_RECIPE), "--out", str(out), "--set", f"model.name_or_path={model_dir}", *extra, timeout=600
    )


def _losses(out):
    return [p["loss"] for p in json.loads((out / "finetune" / "loss.json").read_text())]


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = _run(out, tiny_model_dir, "--set", "train.batch_size=4", "--num-processes", "2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out, result


def test_two_processes_match_one_with_the_same_global_batch(ddp_run, tiny_model_dir, tmp_path):
    out, _ = ddp_run
    single = tmp_path / "single"
    result = _run(single, tiny_model_dir, "--set", "train.batch_size=8", "--set", "stages=[finetune]")
    assert result.returncode == 0, result.stderr[-3000:]

    assert json.loads((out / "manifest.json").read_text())["training_processes"] == 2
    ddp, one = _losses(out), _losses(single)
    assert len(ddp) == len(one) == 12
    assert ddp[0] == pytest.approx(one[0], abs=1e-5)  # same first batch, same initial weights
    assert ddp == pytest.approx(one, abs=5e-3)  # later steps differ only by reduction order
    assert ddp[-1] < ddp[0] - 0.2


def test_convert_and_eval_run_once_on_a_loadable_checkpoint(ddp_run):
    import torch
    from transformers import AutoModelForCausalLM

    out, result = ddp_run
    assert result.stdout.count("▶ convert running") == 1 and result.stdout.count("▶ eval running") == 1
    assert result.stdout.count("▶ finetune running") == 1  # the second process prints nothing
    assert not list(out.glob(".*.partial")), "no stage left half-written"
    assert json.loads((out / "convert" / "parity.json").read_text())["as_trained_vs_converted"]["sqnr_db"] > 60
    assert "qat" in json.loads((out / "eval" / "results.json").read_text())["variants"]

    model = AutoModelForCausalLM.from_pretrained(out / "convert")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_exit_codes_survive_the_launcher(tiny_model_dir, tmp_path):
    bad = run_cli("run", str(TINY_RECIPE), "--set", "train.lr=-1", "--num-processes", "2")
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "launching" not in bad.stdout  # bad input is caught once, before any process starts

    gate = _run(
        tmp_path / "gate",
        tiny_model_dir,
        *("--set", "qat.lora=unmerged", "--set", "train.lr=0.05", "--set", "convert.parity_min_sqnr=60"),
        *("--set", "stages=[finetune,convert]", "--num-processes", "2"),
    )
    assert gate.returncode == 4, gate.stdout[-2000:] + gate.stderr[-2000:]
