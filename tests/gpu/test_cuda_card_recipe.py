"""The Qwen3-8B int4 card recipe on a tiny Qwen3, on the GPU, with each backend: finetune (int4 fake quant) then
convert to real int4 (torchao's CUDA kernels), reloaded by plain transformers. Only what size forces is overridden;
the scheme, LoRA mode, optimizer (adamw_8bit) and gradient checkpointing are the card's."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from qatkit.quant.hardware import can_convert_here
from qatkit.quant.registry import get_scheme

from ..conftest import DATA, ROOT, arith_texts

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    from qatkit.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), arith_texts(), arch="qwen3")


@pytest.mark.parametrize("backend", ["hf", "unsloth"])
def test_card_recipe_finetunes_and_converts_on_cuda(backend, tiny_qwen3, tmp_path):
    if not can_convert_here(get_scheme("int4")):
        pytest.skip(f"int4 convert needs {', '.join(get_scheme('int4').convert_packages)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("the card's optimizer, adamw_8bit, needs bitsandbytes")
    if backend == "unsloth" and importlib.util.find_spec("unsloth") is None:
        pytest.skip("unsloth is not installed")
    out = tmp_path / backend
    overrides = {
        "backend": backend,
        "model.name_or_path": str(tiny_qwen3),
        "data.path": str(DATA),
        "data.eval_size": "16",
        "train.max_steps": "8",
        "train.batch_size": "8",
        "train.lr": "2e-4",
        # unmerged LoRA drifts from the deployed q(W + s·BA)x as it learns; a tiny random model at 10x the card's
        # lr drifts further than the card's real run, so its gate is lowered (the figure is printed below)
        "convert.parity_min_sqnr": "12",
        "stages": "[finetune,convert]",
    }
    args = [x for key, value in overrides.items() for x in ("--set", f"{key}={value}")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "qatkit", "run", str(ROOT / "recipes" / "qwen3-8b-int4.yaml"), "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    summary = json.loads((out / "finetune" / "train_summary.json").read_text())
    assert summary["backend"] == backend, summary
    losses = [p["loss"] for p in json.loads((out / "finetune" / "loss.json").read_text())]
    assert len(losses) == 8 and min(losses[-3:]) < losses[0], losses
    parity = json.loads((out / "convert" / "parity.json").read_text())
    assert parity["reloaded_vs_in_memory"]["max_abs_diff"] == 0, parity
    # real int4 kernels vs the fake-quantized merged model: rounding in the matmul only
    assert parity["fake_quant_merged_vs_converted"]["sqnr_db"] > 25, parity
    code = (
        "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"d = {str(out / 'convert')!r}\n"
        "m = AutoModelForCausalLM.from_pretrained(d, device_map='cuda'); tok = AutoTokenizer.from_pretrained(d)\n"
        "with torch.no_grad(): y = m(**tok(['What is 3 plus 4?'], return_tensors='pt').to('cuda')).logits\n"
        "print(type(m.model.layers[0].mlp.down_proj.weight).__name__, bool(torch.isfinite(y).all()))\n"
    )
    check = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-3000:]
    print(f"{backend}: losses {losses[0]:.3f} -> {losses[-1]:.3f}, parity {json.dumps(parity)[:400]}")
    weight_type, finite = check.stdout.split()[-2:]
    assert weight_type.startswith("Int4") and finite == "True", check.stdout
