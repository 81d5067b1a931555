"""`qatkit bench gguf-recovery RUN_DIR`: accuracy where a q4_0 / q8_0 run is deployed. llama.cpp's NLL per token on
held-out text the run never trained on (the recipe's eval.text_path, as the eval stage takes it) of

- F16: the reference model in F16, the reference being the run's no-QAT fine-tune when it trained one, else the
  base model (a recipe with no task, or QAT without a control);
- plain: the reference quantized to the same GGUF type by llama.cpp's grid (the q4_0 / q8_0 PTQ, bit for bit
  what gguf-py's quantizer writes);
- QAT: the run's export/model.gguf;

and the share of the plain quantization's NLL rise that QAT wins back, (plain - QAT) / (plain - F16).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from qatkit.core.errors import RecipeError
from qatkit.core.io import write_json_atomic
from qatkit.recipe import load_recipe
from qatkit.run.rundir import RunDir


def _reference(recipe, run: RunDir):
    """The model QAT is measured against, and what it is."""
    from qatkit.models.assembly import load_finetuned
    from qatkit.models.loading import load_model_and_tokenizer

    control = run.finetune.control.trained(recipe.train.full_finetuning)
    if control.exists():
        return load_finetuned(recipe, control)[0], "the run's fine-tune without QAT"
    return load_model_and_tokenizer(recipe.model)[0], "the base model"


def gguf_recovery(run_path: Path, out: Path, threads: int = 1) -> dict:
    from transformers import AutoTokenizer

    from qatkit.bench.common import quiet
    from qatkit.evaluation.nll import load_texts
    from qatkit.export.gguf import check_exportable, export_gguf
    from qatkit.export.gguf_engine import text_nll
    from qatkit.quant.apply import quantize_ptq

    quiet()
    run = RunDir(run_path.resolve())
    qat_file = run.export.gguf
    if not qat_file.exists():
        raise RecipeError(f"{run_path}: no export/model.gguf (run `qatkit export {run_path} --format gguf` first)")
    recipe = load_recipe(run.resolved_recipe)
    if not recipe.eval.text_path:
        raise RecipeError(f"{run_path}: the recipe sets no eval.text_path, the held-out text to score")
    qtype = check_exportable(recipe.quant.name)
    tokenizer = AutoTokenizer.from_pretrained(run.convert.root)
    spec = recipe.eval
    sequences = [tokenizer(t, add_special_tokens=True).input_ids[: spec.text_max_tokens] for t in load_texts(spec)]
    reference, reference_is = _reference(recipe, run)
    files = {"QAT": qat_file}
    with tempfile.TemporaryDirectory(prefix="qatkit-gguf-recovery-") as tmp:
        files["F16"], files["plain"] = Path(tmp) / "f16.gguf", Path(tmp) / "plain.gguf"
        source, embeddings = recipe.model.name_or_path, recipe.export.gguf.embeddings
        export_gguf(reference, source, files["F16"], "F16", "f16")
        quantize_ptq(reference, recipe.quant)
        export_gguf(reference, source, files["plain"], qtype, embeddings)
        scored = {name: text_nll(path, sequences, threads) for name, path in files.items()}
        sizes = {name: path.stat().st_size for name, path in files.items()}
    nll = {name: value for name, (value, _) in scored.items()}
    rise = nll["plain"] - nll["F16"]
    result = {
        "run": str(run_path),
        "scheme": recipe.quant.name,
        "gguf_type": qtype,
        "reference": reference_is,
        "text": {"path": spec.text_path, "docs": len(sequences), "tokens": scored["QAT"][1]},
        "nll": nll,
        "perplexity": {name: math.exp(v) for name, v in nll.items()},
        "file_bytes": sizes,
        "recovery": None if rise <= 0 else (nll["plain"] - nll["QAT"]) / rise,
        "threads": threads,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "gguf-recovery.json", result)
    (out / "gguf-recovery.md").write_text(render(result))
    return result


def render(r: dict) -> str:
    recovery = "—" if r["recovery"] is None else f"{100 * r['recovery']:.1f}%"
    rows = [
        f"| {name} | {r['nll'][name]:.4f} | {r['perplexity'][name]:.2f} | {r['file_bytes'][name] / 2**20:.1f} MiB |"
        for name in ("F16", "plain", "QAT")
    ]
    return "\n".join(
        [
            f"# Accuracy in llama.cpp: {r['run']}",
            "",
            f"llama.cpp's NLL per token on `{r['text']['path']}` ({r['text']['docs']} held-out documents, "
            f"{r['text']['tokens']} tokens scored), never trained on. F16 and plain {r['gguf_type']} are "
            f"{r['reference']}; QAT is the run's export.",
            "",
            "| GGUF | NLL/token | perplexity | file |",
            "|---|---|---|---|",
            *rows,
            "",
            f"QAT wins back {recovery} of the NLL that plain {r['gguf_type']} adds: (plain - QAT) / (plain - F16).",
            "",
        ]
    )
