"""lm-eval: the only module that imports lm_eval. Tasks from its registry (plus --include-path dirs) are checked for
offline availability before any model loads; the recipe's held-out split becomes a local task (`heldout`)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from qatkit.core import progress
from qatkit.core.errors import EnvError, RecipeError
from qatkit.data import chat_prompt, read_items
from qatkit.recipe import EvalSpec

HELDOUT = "heldout"
METRICS = ("acc", "acc_norm")


def heldout_choices(item, style: str) -> list[str]:
    """Letters are scored as single tokens (" B", no period) so lm-eval runs each shared context once."""
    return [c.rstrip(".") for c in item.continuations(style)] if style == "letter" else item.continuations(style)


def primary_metric(style: str) -> str:
    """Letters are one token each: plain log-likelihood. Texts differ in length: length-normalized."""
    return "acc" if style == "letter" else "acc_norm"


def write_heldout_task(tokenizer, eval_file: Path, task_dir: Path, style: str = "letter") -> Path:
    """Local multiple-choice task from the held-out split: the card-formatted prompt, then the answer."""
    import yaml

    items = read_items(eval_file)
    if not items:
        raise RecipeError(f"{eval_file}: no held-out items for the '{HELDOUT}' task (data.eval_size is 0?)")
    task_dir.mkdir(parents=True, exist_ok=True)
    docs = task_dir / f"{HELDOUT}.jsonl"
    rows = [
        {
            "context": chat_prompt(tokenizer, it, style),
            "choices": heldout_choices(it, style),
            "gold": it.answer,
        }
        for it in items
    ]
    docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {
        "task": HELDOUT,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(docs.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "target_delimiter": "",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS],
    }
    (task_dir / f"{HELDOUT}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return task_dir


def task_manager(tasks: list[str], include_paths: list[str]):
    only_local = all(t == HELDOUT for t in tasks)
    return _task_manager(tuple(include_paths), not only_local)


@functools.lru_cache(maxsize=8)
def _task_manager(include_paths: tuple[str, ...], include_defaults: bool):
    """Indexing lm-eval's ~10k task YAMLs takes seconds: build each distinct index once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=include_defaults)


def check_tasks_available(tasks: list[str], include_paths: list[str]) -> None:
    """Before any model loads: every task is known and its data loads (from the local cache when offline)."""
    external = [t for t in tasks if t != HELDOUT]
    if not external:
        return
    tm = task_manager(tasks, include_paths)
    unknown = [t for t in external if t not in tm.all_tasks]
    if unknown:
        raise RecipeError(
            f"unknown lm-eval task(s): {', '.join(unknown)} (see `lm-eval ls tasks`, or --include-path DIR)"
        )
    try:
        tm.load(external)
    except Exception as e:  # datasets raises many types for "not cached while offline"
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise EnvError(
            f"data for task(s) {', '.join(external)} is not available ({type(e).__name__}: {first_line}): "
            "download it while online, or point qatkit at local data with --include-path DIR "
            "(a task YAML with dataset_path: json and local data_files)"
        ) from None


def evaluate_model(
    model, tokenizer, tasks: list[str], spec: EvalSpec, include_paths: list[str], seed: int = 1234
) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=spec.batch_size,
        max_length=model.config.max_position_embeddings,
    )
    progress.quiet_requests(lm)  # lm-eval's per-request bars, unless --verbose
    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        task_manager=task_manager(tasks, include_paths),
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=True,
    )
    scores = {task: _metrics(values) for task, values in out["results"].items()}
    for task, samples in out.get("samples", {}).items():  # per-item scores, for paired comparisons of variants
        ordered = sorted(samples, key=lambda s: s["doc_id"])
        per_item = {m: [float(s[m]) for s in ordered] for m in METRICS if ordered and m in ordered[0]}
        if per_item and task in scores:
            scores[task]["per_item"] = per_item
    return scores


def _metrics(values: dict) -> dict:
    out = {}
    for key, value in values.items():
        metric, _, _filter = key.partition(",")
        if isinstance(value, int | float):
            out[metric] = value
        elif value == "N/A":
            out[metric] = None
    return out
