"""Held-out text NLL/token of a trainer checkpoint, rebuilt as trained (base, GPTQ weights or AWQ scales if any, fake
quantization, adapter, learned scales), with all its fake quantization on, with lm_head's weight quantization off,
and with none: how far a run had got, what lm_head still costs, and how far training moved the model itself (a task
run's cross-entropy moves it away from the unquantized fine-tune on general text too). The checkpoints are an
unfinished run's (`.finetune.partial/checkpoints/`) unless --checkpoints names a folder of them (copies kept from a
run since finished: training deletes its checkpoints when it ends); GPTQ weights or AWQ scales come from the run's
fine-tune, finished or not. The finished run's own adapter is `adapter --checkpoints RUN_DIR/finetune`.

  python scripts/checkpoint_text_nll.py RUN_DIR checkpoint-350 out.json [--checkpoints DIR]
"""

import argparse
import json
from pathlib import Path

import torch

from qatkit.evaluation.nll import load_texts, text_nll
from qatkit.models.assembly import load_checkpoint
from qatkit.quant.patches import each_fake_quantizer
from qatkit.recipe import load_recipe
from qatkit.run.layout import FinetuneDir, RunLayout


def main(run_dir: str, checkpoint: str, out: str, checkpoints: str | None = None) -> None:
    run = RunLayout(Path(run_dir).resolve())
    recipe = load_recipe(run.resolved_recipe)
    unfinished = FinetuneDir(run.partial("finetune")).checkpoints
    model, tokenizer, _ = load_checkpoint(recipe, run, Path(checkpoints or unfinished) / checkpoint)
    model.eval()
    texts = load_texts(recipe.eval)
    quantizers = each_fake_quantizer(model)
    settings = {
        "as trained (all quantized)": lambda fqn, kind: True,
        "all but lm_head weight": lambda fqn, kind: not (kind == "weight" and fqn.split(".")[-1] == "lm_head"),
        "none (the trained weights unquantized)": lambda fqn, kind: False,
    }
    nll = {}
    with torch.no_grad():
        for name, switched_on in settings.items():
            for fqn, kind, fq in quantizers:
                fq.enabled = switched_on(fqn, kind)
            nll[name] = text_nll(model, tokenizer, texts, recipe.eval.text_max_tokens, recipe.eval.batch_size)
            print(f"{checkpoint} {name}: {nll[name]:.4f}", flush=True)
    with open(out, "w") as f:
        json.dump({"run": recipe.name, "checkpoint": checkpoint, "texts": len(texts), "text_nll": nll}, f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the run (its resolved recipe, and its fine-tune's GPTQ weights or AWQ scales)")
    parser.add_argument("checkpoint", help="the checkpoint's folder name, e.g. checkpoint-500")
    parser.add_argument("out", help="the JSON file to write")
    parser.add_argument("--checkpoints", help="the folder holding it (default: RUN_DIR/.finetune.partial/checkpoints)")
    args = parser.parse_args()
    main(args.run_dir, args.checkpoint, args.out, args.checkpoints)
