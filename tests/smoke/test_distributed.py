"""Two-process CPU DDP (gloo) through `qatkit run --num-processes 2` (accelerate's launcher).

The loss must match a single-process run with the same global batch, only the main process writes,
and convert/eval run once on a checkpoint that loads without qatkit.
"""

import json

import pytest

from ..conftest import TINY_RECIPE, arith_texts, run_cli


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


def test_general_distillation_with_learned_log_scales_matches_one_process(tiny_model_dir, tmp_path):
    """distill.general under DDP: the student runs twice a step (task, general batch) through weight_fake_quant_once,
    with learned scales stepped in log space from an AWQ start calibrated on the general text. The general text is
    one document, so every process draws the same general batch and two processes of 4 must train like one of 8."""
    general = tmp_path / "general.jsonl"
    general.write_text(json.dumps({"body": " ".join(arith_texts()[:3])}) + "\n")
    recipe = [
        *("--set", "qat.lora=merged", "--set", "qat.learn_scales=true", "--set", "qat.scale_space=log"),
        *("--set", "qat.scale_lr=1e-2", "--set", "qat.awq.calibration=general", "--set", "qat.awq.max_tokens=32"),
        *("--set", "distill.teacher=base", "--set", "distill.weight=0.5", "--set", f"distill.general.path={general}"),
        *("--set", "distill.general.field=body", "--set", "distill.general.weight=2"),
        *("--set", "distill.general.max_tokens=48", "--set", "stages=[finetune]"),
    ]
    two = _run(tmp_path / "two", tiny_model_dir, *recipe, "--set", "train.batch_size=4", "--num-processes", "2")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    one = _run(tmp_path / "one", tiny_model_dir, *recipe, "--set", "train.batch_size=8")
    assert one.returncode == 0, one.stderr[-3000:]

    ddp, single = (json.loads((tmp_path / r / "finetune" / "loss.json").read_text()) for r in ("two", "one"))
    assert len(ddp) == len(single) == 12
    for term in ("loss", "ce", "kl_task", "kl_general"):
        assert [p[term] for p in ddp] == pytest.approx([p[term] for p in single], abs=5e-3), term
    assert ddp[-1]["ce"] < ddp[0]["ce"] - 0.2
    assert all(p["kl_general"] > 0 for p in ddp)


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
