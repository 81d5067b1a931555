"""The tiny recipe end to end through the real CLI, in a subprocess, offline."""

import json
import re
import subprocess
import sys

import pytest

from ..conftest import TINY_RECIPE, run_cli


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = run_cli("run", str(TINY_RECIPE), "--out", str(out), "--set", f"model.name_or_path={tiny_model_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_run_dir_layout(tiny_run):
    out, _ = tiny_run
    for stage in ("finetune", "convert", "eval"):
        assert (out / stage / "DONE").exists(), stage
        assert (out / stage / "stage.json").exists(), stage
        assert not (out / f".{stage}.partial").exists()
    for name in ("manifest.json", "recipe.resolved.yaml", "report.md", "report.json", "loss.png", "accuracy.png"):
        assert (out / name).exists(), name
    assert (out / "finetune" / "adapter" / "adapter_config.json").exists()
    card = (out / "convert" / "README.md").read_text()
    assert card.startswith("---\n") and "- torchao" in card and "# Model quality" in card


def test_training_loss_decreased(tiny_run):
    out, _ = tiny_run
    losses = json.loads((out / "finetune" / "loss.json").read_text())
    assert len(losses) == 12
    first, last = losses[0]["loss"], sum(p["loss"] for p in losses[-3:]) / 3
    assert last < first, losses


def test_checkpoint_reloads_in_fresh_process_with_equal_logits(tiny_run):
    out, _ = tiny_run
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = {str(out / "convert")!r}
cfg = json.load(open(d + "/config.json"))
assert cfg["quantization_config"]["quant_method"] == "torchao", cfg
tok = AutoTokenizer.from_pretrained(d)
m = AutoModelForCausalLM.from_pretrained(d)
batch = tok(["What is 3 plus 4?", "The correct answer is B."], return_tensors="pt", padding=True)
with torch.no_grad():
    a = m(**batch).logits
m2 = AutoModelForCausalLM.from_pretrained(d)
with torch.no_grad():
    b = m2(**batch).logits
print(torch.equal(a, b), type(m.model.layers[0].mlp.down_proj.weight).__name__)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    equal, wtype = res.stdout.split()[-2:]
    assert equal == "True"
    assert wtype == "IntxUnpackedToInt8Tensor"
    parity = json.loads((out / "convert" / "parity.json").read_text())
    # the stage compared the reloaded checkpoint against the in-memory converted model
    assert parity["reloaded_vs_in_memory"]["max_abs_diff"] == 0
    assert parity["as_trained_vs_converted"]["sqnr_db"] >= 20


def test_results_and_report(tiny_run):
    out, result = tiny_run
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results["variants"]) == {"bf16", "ptq", "qat"}
    for variant in results["variants"].values():
        held = variant["tasks"]["heldout"]
        assert 0.0 <= held["acc"] <= 1.0
        per_item = held["per_item"]["acc"]  # in item order, for paired comparisons
        assert len(per_item) == held["sample_len"] and sum(per_item) / len(per_item) == pytest.approx(held["acc"])

    report = (out / "report.md").read_text()
    assert "| task | variant | accuracy (%) | ± stderr | normalized degradation |" in report
    assert "fine-tuned with QAT, converted" in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["status"] for s in manifest["stages"].values()} == {"done"}
    assert manifest["model"]["kind"] == "local" and len(manifest["model"]["config_and_weights_sha256"]) == 16
    assert manifest["device"].startswith(("cpu", "cuda")) and manifest["versions"]["torchao"]
    assert manifest["data"]["sha256_16"] and manifest["parity"]["reloaded_vs_in_memory"]["max_abs_diff"] == 0

    assert "quality" in result.stdout and "checkpoint:" in result.stdout


def test_output_shows_progress_lines_not_raw_dicts_bars_or_warnings(tiny_run):
    """Piped (no terminal): qatkit's own short lines; not the Trainer's dicts, lm-eval's bars or torch's warnings."""
    _, result = tiny_run
    out = result.stdout + result.stderr
    assert "{'loss'" not in out and "'train_runtime'" not in out
    assert re.search(r"^✓ QAT training: 12/12 steps, loss \d+\.\d{4} → \d+\.\d{4}, [\d.]+ s$", result.stdout, re.M)
    assert [line.split(" — ")[0] for line in result.stdout.splitlines() if line.startswith("✓ eval")] == [
        "✓ eval 1/3 qat",
        "✓ eval 2/3 ptq",
        "✓ eval 3/3 bf16",
    ]
    assert "Running loglikelihood requests" not in out and "Tokenizing train dataset" not in out
    assert "register_constant" not in out


def test_report_rebuilds_without_rerunning(tiny_run):
    out, _ = tiny_run
    (out / "report.md").unlink()
    res = run_cli("report", str(out))
    assert res.returncode == 0, res.stderr
    assert "normalized degradation" in (out / "report.md").read_text()


def test_existing_run_dir_is_refused_without_force(tiny_run, tiny_model_dir):
    out, _ = tiny_run
    res = run_cli("run", str(TINY_RECIPE), "--out", str(out), "--set", f"model.name_or_path={tiny_model_dir}")
    assert res.returncode == 2
    assert "--resume" in res.stderr and "--force" in res.stderr


def test_resume_skips_finished_stages(tiny_run, tiny_model_dir):
    out, _ = tiny_run
    before = (out / "convert" / "DONE").read_text()
    res = run_cli(
        "run", str(TINY_RECIPE), "--out", str(out), "--resume", "--set", f"model.name_or_path={tiny_model_dir}"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("skipped (done)") == 3
    assert (out / "convert" / "DONE").read_text() == before


def test_control_run_baselines_and_gold_nll(tiny_model_dir, tmp_path):
    """ft-bf16 / ft-ptq: a no-QAT control finetune with the same data/seed/steps, shared across runs."""
    args = [
        "--set",
        f"model.name_or_path={tiny_model_dir}",
        "--set",
        "eval.baselines=[bf16,ptq,ft-bf16,ft-ptq]",
        "--set",
        "train.max_steps=4",
    ]
    first = run_cli("run", str(TINY_RECIPE), "--out", str(tmp_path / "a"), *args)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "a" / "eval" / "results.json").read_text())
    assert set(results["variants"]) == {"bf16", "ptq", "ft-bf16", "ft-ptq", "qat"}
    for v in results["variants"].values():
        assert v["tasks"]["heldout"]["gold_nll"] > 0
    report = (tmp_path / "a" / "report.md").read_text()
    assert "vs fine-tuned without QAT" in report and "gold NLL/token" in report
    assert "fine-tuned without QAT, then PTQ" in report
    control = json.loads((tmp_path / "a" / "finetune" / "train_summary.json").read_text())["control"]
    assert control["fake_quantized_modules"] == 0 and control["steps"] == 4

    second = run_cli("run", str(TINY_RECIPE), "--out", str(tmp_path / "b"), *args, "--set", "qat.scheme=w4-intx")
    assert second.returncode == 0, second.stderr[-3000:]
    control_b = json.loads((tmp_path / "b" / "finetune" / "train_summary.json").read_text())["control"]
    assert control_b["cache_key"] == control["cache_key"]  # the scheme-independent control was reused
    seconds_b = json.loads((tmp_path / "b" / "eval" / "results.json").read_text())["seconds"]
    assert seconds_b["bf16"] == "cached" and seconds_b["ft-bf16"] == "cached"  # scheme-independent evals too
    assert seconds_b["ft-ptq"] != "cached" and seconds_b["qat"] != "cached"

    assert (tmp_path / "b" / "finetune" / "control" / "adapter" / "adapter_model.safetensors").exists()


def test_concurrent_runs_compute_each_cache_entry_once(tiny_model_dir, tmp_path):
    """Two runs started together on a cold cache: the shared no-QAT control and the scheme-independent
    baselines are computed by one of them while the other waits, then reused (never computed twice or torn)."""
    import os

    env = {**os.environ, "QATKIT_CACHE": str(tmp_path / "cache")}
    args = ["--set", f"model.name_or_path={tiny_model_dir}", "--set", "eval.baselines=[bf16,ft-bf16]"]
    args += ["--set", "train.max_steps=4"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "qatkit", "run", str(TINY_RECIPE), "--out", str(tmp_path / name), *args, *extra],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, extra in (("a", []), ("b", ["--set", "qat.scheme=w4-intx"]))
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    controls = [json.loads((tmp_path / n / "finetune" / "train_summary.json").read_text())["control"] for n in "ab"]
    assert controls[0] == controls[1]  # one training (its own seconds), read by both
    seconds = [json.loads((tmp_path / n / "eval" / "results.json").read_text())["seconds"] for n in "ab"]
    for variant in ("bf16", "ft-bf16"):
        assert sorted(s[variant] == "cached" for s in seconds) == [False, True], seconds
