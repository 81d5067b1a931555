"""Where does held-out text NLL go under quantization, before and after QAT? For a finished no-task run: text NLL/token
(the recipe's eval.text_path, the last DOCS documents) of the base model's round-to-nearest fake quantization (PTQ)
and of the QAT model as trained, each with all fake quantization on, all off, and off in one decoder layer or one
kind of module at a time. A part's share of the loss is how much switching it off lowers the NLL.

  python scripts/qat_text_residual_by_part.py RUN_DIR 25 out.json
"""

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from qatkit.evaluation.nll import load_texts, text_nll
from qatkit.models.assembly import load_trained, prepare_for_qat
from qatkit.models.loading import load_model_and_tokenizer
from qatkit.quant.patches import each_fake_quantizer
from qatkit.recipe import load_recipe
from qatkit.run.layout import RunLayout


def _module(fqn: str) -> str:  # peft wraps a quantized linear: its fake quantizers sit on `<name>.base_layer`
    return fqn.removesuffix(".base_layer")


def _layer(fqn: str) -> int | None:
    found = re.search(r"\.layers\.(\d+)\.", fqn)
    return int(found.group(1)) if found else None


def _score(model, tokenizer, texts, recipe, settings: dict[str, Callable[[str], bool]]) -> dict[str, float]:
    """NLL with the fake quantizers of the modules each setting switches off (all others on)."""
    quantizers = each_fake_quantizer(model)
    out = {}
    with torch.no_grad():
        for name, switched_off in settings.items():
            for fqn, _, fq in quantizers:
                fq.enabled = not switched_off(_module(fqn))
            out[name] = round(text_nll(model, tokenizer, texts, recipe.eval.text_max_tokens, recipe.eval.batch_size), 4)
            print(f"{name}: {out[name]}", flush=True)
    return out


def main(run_dir: str, docs: str, out: str) -> None:
    run = RunLayout(Path(run_dir).resolve())
    recipe = load_recipe(run.resolved_recipe)
    texts = load_texts(recipe.eval)[-int(docs) :]

    model, tokenizer = load_model_and_tokenizer(recipe.model)
    prepare_for_qat(recipe, model)
    names = [_module(fqn) for fqn, _, _ in each_fake_quantizer(model)]
    layers = sorted({i for n in names if (i := _layer(n)) is not None})
    kinds = sorted({n.split(".")[-1] for n in names if _layer(n) is not None})
    settings: dict[str, Callable[[str], bool]] = {"all quantized": lambda n: False, "none quantized": lambda n: True}
    settings |= {f"layer {i} off": (lambda n, i=i: _layer(n) == i) for i in layers}
    settings |= {f"{k} off": (lambda n, k=k: _layer(n) is not None and n.split(".")[-1] == k) for k in kinds}
    settings |= {"outside the layers off": lambda n: _layer(n) is None}

    result = {"run": recipe.name, "texts": len(texts), "ptq": _score(model.eval(), tokenizer, texts, recipe, settings)}
    del model
    model, tokenizer, _ = load_trained(recipe, run.finetune.trained(recipe.train.full_finetuning))
    result["qat"] = _score(model.eval(), tokenizer, texts, recipe, settings)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
