"""Where does a QAT model's remaining error sit? Gold-answer NLL/token of held-out items for a trained QAT model
(rebuilt as trained: base + fake quantization + adapters + learned scales) with parts of its fake quantization
switched off, beside the no-QAT control it is compared with.

  python scripts/qat_residual_by_module.py RUN_DIR 150 out.json

RUN_DIR: one (scheme, mode) directory of a `qatkit bench recovery` run (recipe.resolved.yaml, finetune/adapter,
finetune/control/adapter, eval/tasks/heldout.jsonl).
"""

import json
import sys
from pathlib import Path

from qatkit.core.io import read_jsonl
from qatkit.evaluation.nll import heldout_gold_nll
from qatkit.models.assembly import load_finetuned, load_trained
from qatkit.quant.patches import each_fake_quantizer
from qatkit.recipe import load_recipe
from qatkit.run.layout import RunLayout


def _is_lm_head(fqn: str) -> bool:  # never a LoRA target (TRL refuses an adapter there), so never a base_layer
    return fqn.split(".")[-1] == "lm_head"


def main(run_dir: str, n: int, out: str) -> None:
    run = RunLayout(Path(run_dir))
    recipe = load_recipe(run.resolved_recipe)
    full = recipe.train.full_finetuning
    docs = read_jsonl(run.eval.tasks / "heldout.jsonl")[:n]

    control, tokenizer = load_finetuned(recipe, run.finetune.control.trained(full))
    results = {"control (no QAT, unquantized)": heldout_gold_nll(control.eval(), tokenizer, docs)}
    del control

    model, tokenizer, _ = load_trained(recipe, run.finetune.trained(full))
    model.eval()
    quantizers = each_fake_quantizer(model)
    off_sets = {
        "QAT model as trained (all fake quantization on)": lambda fqn, kind: False,
        "lm_head weight not quantized": lambda fqn, kind: kind == "weight" and _is_lm_head(fqn),
        "embedding not quantized": lambda fqn, kind: "embed_tokens" in fqn,
        "activations not quantized": lambda fqn, kind: kind == "activation",
        "decoder linear weights not quantized": lambda fqn, kind: (
            kind == "weight" and not _is_lm_head(fqn) and "embed_tokens" not in fqn
        ),
        "nothing quantized (the QAT-trained weights in full precision)": lambda fqn, kind: True,
    }
    for name, switched_off in off_sets.items():
        for fqn, kind, fq in quantizers:
            fq.enabled = not switched_off(fqn, kind)
        results[name] = heldout_gold_nll(model, tokenizer, docs)
        print(f"{name}: {results[name]:.4f}", flush=True)
    record = {"run": str(run), "scheme": recipe.qat.scheme, "items": len(docs), "gold_nll": results}
    Path(out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
