"""What AWQ's MLP scaling (qat.awq) does before any training: held-out text NLL/token (the recipe's eval.text_path,
the last DOCS documents) of the base model, of its round-to-nearest fake quantization (the recipe's scheme, learned
scales at their start), and of the same after AWQ (the recipe's qat.awq, else its defaults) on the recipe's
calibration examples; plus the AWQ-scaled model with fake quantization off, which must equal the base model's.
With --heldout (a run's eval/tasks/heldout.jsonl), the gold-answer NLL of those items too, as the eval scores it.

  python scripts/awq_ptq_text_nll.py configs/recovery/gemma3-270m-general-q4_0-packed.yaml 25 out.json \
      [--heldout RUN/eval/tasks/heldout.jsonl] [--set qat.awq.channels=[mlp_input,mlp_hidden] ...]
"""

import argparse
import json
import time
from pathlib import Path

import torch

from qatkit.backends.hf import _calibration_batch
from qatkit.core.io import read_jsonl
from qatkit.data import load_splits, training_examples
from qatkit.evaluation.nll import heldout_gold_nll, load_texts, text_nll
from qatkit.models.assembly import prepare_for_qat
from qatkit.models.loading import load_model_and_tokenizer
from qatkit.quant.awq import awq_
from qatkit.quant.patches import each_fake_quantizer, fake_quant_off
from qatkit.recipe import load_recipe
from qatkit.recipe.schema import AwqSpec


def main(recipe_path: str, docs: int, out: str, heldout: str | None, overrides: list[str]) -> None:
    recipe = load_recipe(recipe_path, overrides)
    items = read_jsonl(Path(heldout)) if heldout else []
    texts = load_texts(recipe.eval)[-docs:]
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    model.eval()
    prepare_for_qat(recipe, model)

    result = {"recipe": recipe_path, "overrides": overrides, "texts": len(texts), "heldout_items": len(items)}

    def score(name: str, quantized: bool) -> None:
        """result[name]: the text NLL/token; result[name_gold]: the held-out items' gold-answer NLL/token."""
        quantizers = [fq for _, _, fq in each_fake_quantizer(model)]  # AWQ gives the scaled linears fresh ones
        with torch.no_grad(), fake_quant_off([] if quantized else quantizers):
            result[name] = round(
                text_nll(model, tokenizer, texts, recipe.eval.text_max_tokens, recipe.eval.batch_size), 4
            )
            if items:
                result[f"{name}_gold"] = round(heldout_gold_nll(model, tokenizer, items), 4)

    score("base", quantized=False)
    score("rtn", quantized=True)
    print(result, flush=True)
    examples = training_examples(load_splits(recipe.data), recipe.data.answer_style)
    spec = recipe.qat.awq or AwqSpec()  # the recipe's AWQ settings, else the defaults
    batch = _calibration_batch(examples, tokenizer, spec.samples, spec.max_tokens)
    t0 = time.time()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    scales = awq_(model, ids, mask, recipe.quant.group_size, spec.grid, channels=spec.channels)
    result["awq_seconds"] = round(time.time() - t0, 1)
    score("awq_scaled_unquantized", quantized=False)
    score("awq_rtn", quantized=True)
    result["scaled_pairs"] = sum(not torch.equal(s, torch.ones_like(s)) for s in scales.values())
    result["pairs"] = len(scales)
    print(result, flush=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("docs", type=int)
    parser.add_argument("out")
    parser.add_argument("--heldout", help="a run's eval/tasks/heldout.jsonl: score its gold answers too")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    args = parser.parse_args()
    main(args.recipe, args.docs, args.out, args.heldout, args.overrides)
