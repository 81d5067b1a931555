"""ExecuTorch export of a tiny QAT run through the CLI: the .pte runs in the ExecuTorch runtime and its logits match
the converted model's; generation; the exit codes of what cannot be exported."""

import json
import os
import subprocess
import sys

import pytest

from qatkit.core.errors import GateError
from qatkit.run.records import ExecutorchExport

from ..conftest import ROOT, TINY_RECIPE, run_cli


@pytest.fixture(scope="module")
def exported_run(tiny_model_dir, tmp_path_factory):
    """The tiny recipe trained with int8-int4 QAT, converted, and exported by `qatkit run` (export.formats)."""
    pytest.importorskip("executorch")
    out = tmp_path_factory.mktemp("et-run") / "run"
    res = run_cli(
        "run",
        str(TINY_RECIPE),
        "--out",
        str(out),
        "--set",
        f"model.name_or_path={tiny_model_dir}",
        "--set",
        "stages=[finetune, convert]",
        "--set",
        "train.max_steps=4",
        "--set",
        "export.formats=[executorch]",
        "--set",
        "export.executorch.max_seq_len=128",
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out


def test_pte_logits_match_the_converted_model_in_the_runtime(exported_run):
    record = ExecutorchExport.load(exported_run / "export" / "executorch.json")
    assert record.parity["sqnr_db"] >= 25, record.parity
    assert record.parity["top1_agreement"] >= 0.95, record.parity
    assert record.parity["tokens"] > 50
    pte = exported_run / "export" / "model.pte"
    assert record.pte_bytes == pte.stat().st_size
    # int4 linears and int8 embeddings, not fp32 copies: close to the scheme's floor (fp32 would be ~5x)
    assert record.pte_bytes < 1.5 * record.floor["bytes"], (record.pte_bytes, record.floor)
    manifest = json.loads((exported_run / "manifest.json").read_text())
    assert manifest["export"]["executorch"]["parity"] == record.parity
    assert "ExecuTorch" in (exported_run / "report.md").read_text()
    assert "ExecuTorch" in (exported_run / "convert" / "README.md").read_text()


def test_generate_with_the_pte(exported_run):
    res = run_cli(
        "generate", str(exported_run / "export" / "model.pte"), "--prompt", "What is 2 + 3?", "--max-new-tokens", "6"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ms/token" in res.stdout


def test_export_keeps_other_files_and_replaces_its_own(exported_run):
    other = exported_run / "export" / "model.gguf"
    other.write_bytes(b"another format's file")
    res = run_cli("export", str(exported_run), "--format", "executorch", "--max-seq-len", "64")
    assert res.returncode == 0, res.stderr[-3000:]
    assert other.read_bytes() == b"another format's file"
    assert ExecutorchExport.load(exported_run / "export" / "executorch.json").max_seq_len == 64


def test_parity_below_the_gate_is_exit_4():
    record = ExecutorchExport("int8-int4", 64, 1, {"bytes": 1}, {"sqnr_db": 24.0}, threshold_db=25.0, lower_seconds=1)
    from qatkit.export.executorch import gate

    with pytest.raises(GateError, match="parity_min_sqnr"):
        gate(record)
    assert GateError.exit_code == 4


def test_scheme_executorch_cannot_run_is_exit_2(tiny_model_dir, tmp_path):
    res = run_cli("convert", "--from", str(tiny_model_dir), "--scheme", "int8", "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("export", str(tmp_path / "run"), "--format", "executorch")
    assert res.returncode == 2, res.stderr
    assert "int8-int4" in res.stderr
    res = run_cli("validate", str(TINY_RECIPE), "--set", "qat.scheme=int8", "--set", "export.formats=[executorch]")
    assert res.returncode == 2 and "export.formats" in res.stderr, res.stderr


def test_without_executorch_export_is_exit_3_with_the_install_command(tiny_model_dir, tmp_path):
    res = run_cli("convert", "--from", str(tiny_model_dir), "--scheme", "int8-int4", "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr[-3000:]
    blocker = tmp_path / "block"
    (blocker / "executorch").mkdir(parents=True)
    (blocker / "executorch" / "__init__.py").write_text("raise ImportError('executorch hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(
        [sys.executable, "-m", "qatkit", "export", str(tmp_path / "run"), "--format", "executorch"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 3, res.stderr
    assert "pip install 'qatkit[executorch]'" in " ".join(res.stderr.split())
