"""Both recovery figures of a task run with a no-QAT control (`qatkit bench recovery`) at a trainer checkpoint, before
the run ends: the share of the PTQ NLL loss won back on the held-out task answers and on the eval's held-out text,
(ft->PTQ - checkpoint) / (ft->PTQ - ft), ft being the control. Also the checkpoint's trained weights with no fake
quantization: how far training moved the model itself from the control (on the text, what the task loss costs).

  python scripts/checkpoint_recovery.py RUN_DIR checkpoint-500 out.json [--checkpoints DIR]

RUN_DIR is one scheme's run (e.g. runs/recovery-x/int8-int4-merged); the checkpoints are its unfinished fine-tune's
unless --checkpoints names a folder of copies.
"""

import argparse
import gc
import json
import tempfile
from pathlib import Path

import torch

from qatkit.bench.recovery import recovery
from qatkit.core.io import read_jsonl
from qatkit.core.metrics import normalized_degradation
from qatkit.evaluation.lmeval import HELDOUT, write_heldout_task
from qatkit.evaluation.nll import heldout_gold_nll, load_texts, text_nll
from qatkit.models.assembly import load_checkpoint, load_finetuned
from qatkit.quant.apply import quantize_ptq
from qatkit.quant.patches import each_fake_quantizer, fake_quant_off
from qatkit.recipe import load_recipe
from qatkit.run.layout import FinetuneDir, RunLayout


def main(run_dir: str, checkpoint: str, out: str, checkpoints: str | None = None) -> None:
    run = RunLayout(Path(run_dir).resolve())
    recipe = load_recipe(run.resolved_recipe)
    texts = load_texts(recipe.eval)
    nll: dict[str, dict[str, float]] = {"task": {}, "text": {}}

    def score(variant: str, model, tokenizer, docs: list[dict]) -> None:
        with torch.no_grad():
            nll["task"][variant] = heldout_gold_nll(model, tokenizer, docs)
            nll["text"][variant] = text_nll(model, tokenizer, texts, recipe.eval.text_max_tokens)  # as eval does
        print(f"{variant}: task answers {nll['task'][variant]:.4f}, text {nll['text'][variant]:.4f}", flush=True)

    control = FinetuneDir(run.stage_so_far("finetune")).control.trained(recipe.train.full_finetuning)
    model, tokenizer = load_finetuned(recipe, control)
    with tempfile.TemporaryDirectory() as tmp:  # the held-out items as the eval stage prompts them
        task_dir = write_heldout_task(tokenizer, run.eval_data, Path(tmp), recipe.data.answer_style)
        docs = read_jsonl(task_dir / f"{HELDOUT}.jsonl")[: recipe.eval.limit]
    score("ft", model.eval(), tokenizer, docs)
    del model
    model = load_finetuned(recipe, control)[0]
    quantize_ptq(model, recipe.quant)
    score("ft-ptq", model.eval(), tokenizer, docs)
    del model
    gc.collect()
    unfinished = FinetuneDir(run.partial("finetune")).checkpoints
    model, tokenizer, _ = load_checkpoint(recipe, run, Path(checkpoints or unfinished) / checkpoint)
    score(checkpoint, model.eval(), tokenizer, docs)
    with fake_quant_off(fq for _, _, fq in each_fake_quantizer(model)):
        score(f"{checkpoint} unquantized", model, tokenizer, docs)
    recovered = {
        part: recovery(normalized_degradation(v[checkpoint], v["ft"], v["ft-ptq"], lower_is_better=True))
        for part, v in nll.items()
    }
    print(f"recovered: task answers {recovered['task']:.1%}, text {recovered['text']:.1%}")
    result = {"run": recipe.name, "checkpoint": checkpoint, "texts": len(texts), "items": len(docs)}
    Path(out).write_text(json.dumps({**result, "nll": nll, "recovered": recovered}, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="one scheme's run of `qatkit bench recovery` (with its control)")
    parser.add_argument("checkpoint", help="the checkpoint's folder name, e.g. checkpoint-500")
    parser.add_argument("out", help="the JSON file to write")
    parser.add_argument("--checkpoints", help="the folder holding it (default: RUN_DIR/.finetune.partial/checkpoints)")
    args = parser.parse_args()
    main(args.run_dir, args.checkpoint, args.out, args.checkpoints)
