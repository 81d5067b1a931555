"""Where does PTQ's loss sit? Held-out text NLL/token of a recipe's base model with its scheme's fake quantization
(round to nearest on the recipe's `qat.scale_init` scales) switched on one part at a time, then with lm_head from GPTQ
(`qat.gptq.targets: lm_head`, calibrated on the first training examples).

  python scripts/ptq_error_by_part.py configs/recovery/smollm2-general-gptq-head.yaml out.json

The text is the recipe's `eval.text_path` (what the recovery figures are scored on); the calibration examples are
the recipe's training data as `qatkit run` prepares it.
"""

import json
import sys

import torch

from qatkit.backends.hf import _calibration_batch
from qatkit.data import load_splits, training_examples
from qatkit.evaluation.nll import load_texts, text_nll
from qatkit.models.loading import load_model_and_tokenizer
from qatkit.quant.apply import prepare
from qatkit.quant.gptq import gptq_
from qatkit.quant.patches import each_fake_quantizer
from qatkit.recipe import load_recipe


def _is_lm_head(fqn: str) -> bool:
    return fqn.split(".")[-1] == "lm_head"


PARTS = {
    "nothing quantized": lambda fqn, kind: False,
    "all quantized (PTQ)": lambda fqn, kind: True,
    "only lm_head weight": lambda fqn, kind: kind == "weight" and _is_lm_head(fqn),
    "only embedding": lambda fqn, kind: "embed_tokens" in fqn,
    "only activations": lambda fqn, kind: kind == "activation",
    "only decoder linear weights": lambda fqn, kind: (
        kind == "weight" and not _is_lm_head(fqn) and "embed_tokens" not in fqn
    ),
    "all but lm_head weight": lambda fqn, kind: not (kind == "weight" and _is_lm_head(fqn)),
}


def main(recipe_path: str, out: str) -> None:
    recipe = load_recipe(recipe_path)
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    prepare(model, recipe.quant)
    model.eval()
    texts = load_texts(recipe.eval)
    quantizers = each_fake_quantizer(model)

    def score(parts: dict) -> dict[str, float]:
        results = {}
        for name, switched_on in parts.items():
            for fqn, kind, fq in quantizers:
                fq.enabled = switched_on(fqn, kind)
            results[name] = text_nll(model, tokenizer, texts, recipe.eval.text_max_tokens, recipe.eval.batch_size)
            print(f"{name}: {results[name]:.4f}", flush=True)
        return results

    with torch.no_grad():
        round_to_nearest = score(PARTS)
        for _, _, fq in quantizers:
            fq.enabled = True
        gptq = recipe.qat.gptq
        examples = training_examples(load_splits(recipe.data), recipe.data.answer_style)
        batch = _calibration_batch(examples, tokenizer, gptq.samples, gptq.max_tokens)
        gptq_(model, batch["input_ids"], batch["attention_mask"], gptq.damp, targets="lm_head")
        head_from_gptq = score({k: PARTS[k] for k in ("all quantized (PTQ)", "only lm_head weight")})
    record = {
        "recipe": recipe_path,
        "scheme": recipe.qat.scheme,
        "scale_init": recipe.quant.scale_init,
        "texts": len(texts),
        "text_max_tokens": recipe.eval.text_max_tokens,
        "nll_round_to_nearest": round_to_nearest,
        "nll_lm_head_from_gptq": head_from_gptq,
    }
    with open(out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
