"""Where QAT starts: held-out text NLL/token (the recipe's eval.text_path) of a qat.gptq run's model before any
training step, from round-to-nearest on the recipe's scale start and from the GPTQ weights the run saved beside its
adapter, with the share of the PTQ loss each already wins back (fp32 and PTQ from the run's own eval).

  python scripts/gptq_start.py RUN_DIR out.json
"""

import json
import sys
from pathlib import Path

import torch

from qatkit.evaluation.nll import load_texts, text_nll
from qatkit.models.loading import load_model_and_tokenizer
from qatkit.quant.apply import prepare
from qatkit.quant.gptq import load_gptq_weights
from qatkit.recipe import load_recipe
from qatkit.run.layout import GPTQ_WEIGHTS, RunLayout


def main(run_dir: str, out: str) -> None:
    run = RunLayout(Path(run_dir))
    recipe = load_recipe(run.resolved_recipe)
    texts = load_texts(recipe.eval)
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    prepare(model, recipe.quant)  # the learned scales' start (qat.scale_init), weights rounded to nearest
    model.eval()

    def nll() -> float:
        with torch.no_grad():
            return round(text_nll(model, tokenizer, texts, recipe.eval.text_max_tokens, recipe.eval.batch_size), 4)

    start = {"round_to_nearest": nll()}
    load_gptq_weights(model, run.finetune.trained(recipe.train.full_finetuning) / GPTQ_WEIGHTS)
    start["gptq"] = nll()
    evaluated = json.loads(run.eval.results.read_text())
    text = {v: evaluated["variants"][v]["text_nll"] for v in ("bf16", "ptq")}
    result = {
        "run": run_dir,
        "text_path": recipe.eval.text_path,
        "text_nll": {**text, **{f"start_{k}": v for k, v in start.items()}},
        "recovered": {k: round((text["ptq"] - v) / (text["ptq"] - text["bf16"]), 4) for k, v in start.items()},
    }
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
