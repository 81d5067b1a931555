"""The GGUF export through the CLI: `qatkit run` with export.formats writes <run>/export/model.gguf and its llama.cpp
figures into the manifest, report and model card; `qatkit export` makes it again; the gate and the refusals exit
with their codes."""

import json

import pytest
import torch

from ..conftest import TINY_RECIPE, run_cli

Q4_0_GGUF = ["--set", "qat.scheme=q4_0", "--set", "export.formats=[gguf]", "--set", "train.max_steps=3"]


def test_run_exports_gguf_and_reports_llama_cpp_parity(tiny_model_dir, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llamacpp extra) is not installed")
    out = tmp_path / "run"
    res = run_cli(
        "run", str(TINY_RECIPE), "--out", str(out), "--set", f"model.name_or_path={tiny_model_dir}",
        "--set", "stages=[finetune,convert]", *Q4_0_GGUF,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "export" / "model.gguf").stat().st_size > 0 and (out / "export" / "DONE").exists()
    gguf = json.loads((out / "manifest.json").read_text())["export"]["gguf"]
    assert gguf["weights"] == "Q4_0" and gguf["packed_not_bit_exact"] == []
    assert gguf["llama_cpp"]["sqnr_db"] >= 30 and gguf["llama_cpp"]["top1_agreement"] >= 0.97
    assert "## llama.cpp (GGUF export)" in (out / "report.md").read_text()
    assert "FROM ./model.gguf" in (out / "convert" / "README.md").read_text()
    assert "gguf:" in res.stdout

    (out / "export" / "model.gguf").unlink()
    res = run_cli("export", str(out), "--format", "gguf")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "export" / "model.gguf").exists()


def test_gguf_gate_exits_4(tiny_model_dir, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llamacpp extra) is not installed")
    res = run_cli(
        "run", str(TINY_RECIPE), "--out", str(tmp_path / "ptq"), "--set", f"model.name_or_path={tiny_model_dir}",
        "--set", "stages=[convert]", "--set", "export.gguf.parity_min_sqnr=200", *Q4_0_GGUF,
    )  # fmt: skip
    assert res.returncode == 4, res.stderr[-3000:]
    assert "export.gguf.parity_min_sqnr=200" in res.stderr + res.stdout
    assert (tmp_path / "ptq" / "export" / "gguf.json").exists()  # published for inspection


def test_gguf_export_refuses_other_schemes(tiny_model_dir, tmp_path):
    res = run_cli(
        "validate", str(TINY_RECIPE), "--set", f"model.name_or_path={tiny_model_dir}", "--set", "export.formats=[gguf]"
    )
    assert res.returncode == 2 and "q4_0, q8_0" in res.stderr + res.stdout
    res = run_cli("export", str(tmp_path), "--format", "gguf")
    assert res.returncode == 2 and "not a qatkit run dir" in res.stderr + res.stdout


def test_gguf_recovery_scores_the_three_gguf_files_in_llama_cpp(tiny_model_dir, tmp_path):
    """`qatkit bench gguf-recovery`: llama.cpp's NLL on held-out text of F16, plain Q4_0 and the QAT export, and
    the recovery computed from them; the plain file is the reference quantized on the same grid."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llamacpp extra) is not installed")
    from ..conftest import arith_texts

    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in arith_texts()[-30:]))
    out = tmp_path / "run"
    res = run_cli(
        "run", str(TINY_RECIPE), "--out", str(out), "--set", f"model.name_or_path={tiny_model_dir}",
        "--set", "stages=[finetune,convert]", "--set", f"eval.text_path={text}", "--set", "eval.text_docs=20",
        "--set", "eval.baselines=[ft-bf16]", *Q4_0_GGUF,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("bench", "gguf-recovery", str(out), "--out", str(tmp_path / "bench"))
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((tmp_path / "bench" / "gguf-recovery.json").read_text())
    assert r["reference"] == "the run's fine-tune without QAT" and r["text"]["docs"] == 20 and r["text"]["tokens"] > 100
    nll = r["nll"]
    assert all(0 < v < 20 for v in nll.values()) and nll["plain"] != nll["F16"]
    assert r["file_bytes"]["plain"] == r["file_bytes"]["QAT"] < r["file_bytes"]["F16"]
    if r["recovery"] is not None:
        assert r["recovery"] == pytest.approx((nll["plain"] - nll["QAT"]) / (nll["plain"] - nll["F16"]))
    assert "QAT wins back" in (tmp_path / "bench" / "gguf-recovery.md").read_text()


def test_learned_q4_0_scales_from_gptq_export_and_run_in_llama_cpp(tiny_model_dir, tmp_path):
    """Q4_0 with learned block scales, started from GPTQ: any fp16 scale is a Q4_0 block, so the export packs the
    trained integers on the trained scales bit for bit and llama.cpp runs them at the parity the gate asks."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llamacpp extra) is not installed")
    from safetensors.torch import load_file

    out = tmp_path / "run"
    res = run_cli(
        "run", str(TINY_RECIPE), "--out", str(out), "--set", f"model.name_or_path={tiny_model_dir}",
        "--set", "stages=[finetune,convert]", *Q4_0_GGUF, "--set", "qat.learn_scales=true",
        "--set", "qat.gptq.samples=4", "--set", "train.lr=0.01",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    adapter = out / "finetune" / "adapter"
    scales = load_file(adapter / "learned_scales.safetensors")["model.layers.0.mlp.down_proj"]
    start = load_file(adapter / "gptq_weights.safetensors")["model.layers.0.mlp.down_proj.scale"]
    assert scales.shape == start.shape and not torch.equal(scales, start)  # trained away from the start
    assert json.loads((out / "convert" / "parity.json").read_text())["as_trained_vs_converted"]["sqnr_db"] == float(
        "inf"
    )
    gguf = json.loads((out / "manifest.json").read_text())["export"]["gguf"]
    assert gguf["weights"] == "Q4_0" and gguf["packed_not_bit_exact"] == []
    assert gguf["llama_cpp"]["sqnr_db"] >= 30 and gguf["llama_cpp"]["top1_agreement"] >= 0.97
