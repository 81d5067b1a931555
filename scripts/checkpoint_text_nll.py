"""Held-out text NLL/token of a trainer checkpoint of an unfinished run (`.finetune.partial/checkpoints/checkpoint-N`),
rebuilt as trained (base, GPTQ weights or AWQ scales if any, fake quantization, adapter, learned scales), with all
its fake quantization on and with lm_head's weight quantization off: how far a run had got, and what lm_head still
costs.

  python scripts/checkpoint_text_nll.py RUN_DIR checkpoint-350 out.json
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

from qatkit.evaluation.nll import load_texts, text_nll
from qatkit.models.assembly import load_trained
from qatkit.quant.patches import each_fake_quantizer
from qatkit.recipe import load_recipe
from qatkit.run.layout import AWQ_SCALES, GPTQ_WEIGHTS, FinetuneDir, RunLayout


def main(run_dir: str, checkpoint: str, out: str) -> None:
    run = RunLayout(Path(run_dir).resolve())
    partial = FinetuneDir(run.partial("finetune"))  # an unfinished fine-tune's stage dir
    recipe = load_recipe(run.resolved_recipe)
    with tempfile.TemporaryDirectory() as tmp:  # the checkpoint's files, with the GPTQ weights it was trained on
        trained = Path(tmp)
        for f in (partial.checkpoints / checkpoint).iterdir():
            (trained / f.name).symlink_to(f)
        for start, needed in ((GPTQ_WEIGHTS, recipe.qat.gptq), (AWQ_SCALES, recipe.qat.awq)):
            if needed:
                (trained / start).symlink_to(partial.trained(full_finetuning=False) / start)
        model, tokenizer, _ = load_trained(recipe, trained)
    model.eval()
    texts = load_texts(recipe.eval)
    quantizers = each_fake_quantizer(model)
    settings = {
        "as trained (all quantized)": lambda fqn, kind: True,
        "all but lm_head weight": lambda fqn, kind: not (kind == "weight" and fqn.split(".")[-1] == "lm_head"),
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
    main(*sys.argv[1:4])
