"""Where does a scheme's PTQ loss on held-out text come from? Text NLL/token (a recipe's eval.text_path) of the base
model, and of its round-to-nearest fake quantization with parts switched off: weights only, activations only,
everything but lm_head, lm_head only, embeddings only.

  python scripts/ptq_text_damage_by_part.py configs/recovery/smollm2-general.yaml int8-int4 out.json
"""

import json
import sys
from pathlib import Path

import torch

from qatkit.evaluation.nll import load_texts, text_nll
from qatkit.models.loading import load_model_and_tokenizer
from qatkit.quant.apply import prepare
from qatkit.quant.spec import QuantSpec
from qatkit.recipe import load_recipe

PARTS = {  # which (weight, activation) fake quantizers stay on, by module name
    "all": (lambda n: True, lambda n: True),
    "weights only": (lambda n: True, lambda n: False),
    "activations only": (lambda n: False, lambda n: True),
    "all but lm_head": (lambda n: n != "lm_head", lambda n: n != "lm_head"),
    "lm_head only": (lambda n: n == "lm_head", lambda n: n == "lm_head"),
    "embeddings only": (lambda n: "embed" in n, lambda n: False),
}


def main(recipe_path: str, scheme: str, out: str) -> None:
    recipe = load_recipe(recipe_path)
    texts = load_texts(recipe.eval)
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    model.eval()

    def nll() -> float:
        with torch.no_grad():
            return round(text_nll(model, tokenizer, texts, recipe.eval.text_max_tokens, recipe.eval.batch_size), 4)

    result = {"recipe": recipe_path, "scheme": scheme, "text_path": recipe.eval.text_path, "base": nll()}
    prepare(model, QuantSpec.named(scheme))
    for part, (weights_on, activations_on) in PARTS.items():
        for name, module in model.named_modules():
            if getattr(module, "weight_fake_quantizer", None) is not None:
                module.weight_fake_quantizer.enabled = weights_on(name)
            if getattr(module, "activation_fake_quantizer", None) is not None:
                module.activation_fake_quantizer.enabled = activations_on(name)
        result[part] = nll()
        print(part, result[part], flush=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
