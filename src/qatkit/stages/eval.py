"""eval stage: lm-eval on the converted model and the baselines (bf16 original, PTQ of the original).

The only module that imports lm_eval. The recipe's held-out split becomes a local lm-eval task
(`heldout`), so evaluation runs offline; other task names go to lm-eval's registry (plus
`--include-path` dirs), checked for offline availability before any model loads.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from qatkit import progress, schemes
from qatkit.backends.base import trained_dir
from qatkit.data import chat_prompt, read_items, read_jsonl
from qatkit.errors import EnvError, RecipeError
from qatkit.recipe import EvalSpec
from qatkit.stages.finetune import CONTROL

log = logging.getLogger(__name__)

HELDOUT = "heldout"
METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class Variant:
    name: str  # "qat", "bf16", "ptq", ...
    path: str | None  # checkpoint dir to load, or None for the recipe's base model
    quantize: bool = False  # apply the scheme as PTQ after loading
    control: str | None = None  # what the no-QAT control run trained: a LoRA adapter to merge, or full weights
    control_key: str | None = None  # identity of that run (its cache key), for caching


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


def preflight(tasks: list[str], include_paths: list[str]) -> None:
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


def _cache_key(variant: Variant, spec: EvalSpec, tasks: list[str], base_id: str, scheme: str, heldout_hash: str) -> str:
    from qatkit.loading import code_fingerprint

    text = [spec.text_path, spec.text_field, spec.text_docs, spec.text_max_tokens] if spec.text_path else None
    key = [
        "v3",  # v3: per-item scores
        variant.name,
        base_id,
        scheme if variant.quantize else None,  # bf16 / ft-bf16 do not depend on the scheme
        tasks,
        spec.limit,
        spec.num_fewshot,
        spec.include_path,
        heldout_hash,
        text,
        variant.control_key,
        code_fingerprint(),
    ]
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


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


def gold_nll(model, tokenizer, contexts: list[str], golds: list[str], batch_size: int = 8) -> float:
    """Mean negative log-likelihood per token of the gold answers given their prompts: a precise,
    low-variance companion to accuracy (every item contributes, not just the argmax). A quantized model's figure
    depends on how items are batched at about 1e-4 (matmul rounding moves some activations to another integer)."""
    import torch

    pairs = [
        (tokenizer(c, add_special_tokens=False).input_ids, tokenizer(g, add_special_tokens=False).input_ids)
        for c, g in zip(contexts, golds, strict=True)
    ]
    pairs.sort(key=lambda pair: len(pair[0]) + len(pair[1]))  # batches of similar lengths: little padding
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i : i + batch_size]
        seqs = [c + g for c, g in batch]
        width = max(map(len, seqs))
        pad = tokenizer.pad_token_id or 0
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
            for row, (c, g) in enumerate(batch):
                # the positions that predict the gold tokens, normalized over the vocabulary there only
                logprobs = torch.log_softmax(logits[row, len(c) - 1 : len(c) + len(g) - 1].float(), dim=-1)
                total -= logprobs.gather(1, torch.tensor(g, device=logits.device)[:, None]).sum().item()
                count += len(g)
    return total / max(count, 1)


def text_nll(model, tokenizer, texts: list[str], max_tokens: int, batch_size: int = 8) -> float:
    """Mean NLL per token of held-out running text (each document truncated to `max_tokens`)."""
    ids = [tokenizer(t, add_special_tokens=True).input_ids[:max_tokens] for t in texts]
    # the first token has no context: score tokens 2..n given their prefix
    return gold_nll(
        model,
        tokenizer,
        [tokenizer.decode(x[:1]) for x in ids],
        [tokenizer.decode(x[1:]) for x in ids],
        batch_size,
    )


def load_texts(spec: EvalSpec) -> list[str]:
    from qatkit.loading import resolve_path

    rows = read_jsonl(resolve_path(spec.text_path))
    texts = [r[spec.text_field] for r in rows if isinstance(r.get(spec.text_field), str) and r[spec.text_field].strip()]
    if not texts:
        raise RecipeError(f"eval.text_path {spec.text_path}: no rows with a text field {spec.text_field!r}")
    return texts[-spec.text_docs :]  # the tail: training data (if any) is taken from elsewhere


def _metrics(values: dict) -> dict:
    out = {}
    for key, value in values.items():
        metric, _, _filter = key.partition(",")
        if isinstance(value, int | float):
            out[metric] = value
        elif value == "N/A":
            out[metric] = None
    return out


def variants_for(recipe, run_dir) -> list[Variant]:
    """The converted model first ("qat" when finetuned, else it is the PTQ model), then the fine-tune's baselines
    (ft-ptq, ft-bf16), then the base model's (ptq, bf16): what the run is for is scored first."""
    finetuned = "finetune" in recipe.stages
    out = []
    if "convert" in recipe.stages:
        out.append(Variant("qat" if finetuned else "ptq", str(run_dir.stage("convert"))))
    if finetuned:
        control = str(trained_dir(recipe, run_dir.stage("finetune") / CONTROL))
        summary = run_dir.stage("finetune") / "train_summary.json"
        control_key = json.loads(summary.read_text()).get("control", {}).get("cache_key") if summary.exists() else None
        if "ft-ptq" in recipe.eval.baselines:
            out.append(Variant("ft-ptq", None, quantize=True, control=control, control_key=control_key))
        if "ft-bf16" in recipe.eval.baselines:
            out.append(Variant("ft-bf16", None, control=control, control_key=control_key))
        if "ptq" in recipe.eval.baselines:
            out.append(Variant("ptq", None, quantize=True))
    if "bf16" in recipe.eval.baselines:
        out.append(Variant("bf16", None))
    return out


def _load_variant(recipe, variant: Variant):
    from qatkit.loading import load_finetuned, load_model_and_tokenizer

    if variant.control:
        model, tokenizer = load_finetuned(recipe, variant.control)
    else:
        model, tokenizer = load_model_and_tokenizer(recipe.model, path=variant.path)
    if variant.quantize:
        schemes.quantize_ptq(model, schemes.for_recipe(recipe.qat), recipe.qat.group_size)
    return model.eval(), tokenizer


def _evaluate_variant(recipe, variant: Variant, tasks, spec: EvalSpec, include, task_dir: Path | None):
    """Scores of one variant (tasks, gold-answer NLL, held-out text NLL) and the seconds they took."""
    import gc
    import time

    t0 = time.time()
    model, tokenizer = _load_variant(recipe, variant)
    scores = evaluate_model(model, tokenizer, tasks, spec, include, seed=recipe.train.seed)
    if HELDOUT in scores:
        docs = read_jsonl(task_dir / f"{HELDOUT}.jsonl")[: spec.limit]
        golds = [d["choices"][d["gold"]] for d in docs]
        scores[HELDOUT]["gold_nll"] = gold_nll(model, tokenizer, [d["context"] for d in docs], golds)
    result = {"dtype": str(model.dtype).removeprefix("torch."), "tasks": scores}
    if spec.text_path:
        result["text_nll"] = text_nll(model, tokenizer, load_texts(spec), spec.text_max_tokens)
    del model
    gc.collect()
    return result, round(time.time() - t0, 2)


def _cache_dir() -> Path:
    from qatkit.loading import cache_root

    return cache_root() / "eval"


def run(recipe, run_dir, work: Path, resume: bool = False) -> dict:
    from qatkit.loading import cache_lock
    from qatkit.pipeline import write_json_atomic

    spec = recipe.eval
    tasks = list(spec.tasks)
    include = [spec.include_path] if spec.include_path else []
    preflight(tasks, include)
    heldout_hash = ""
    primary = {}
    task_dir = None

    if HELDOUT in tasks:
        if not run_dir.is_done("convert"):
            raise RecipeError(f"eval of '{HELDOUT}' needs a finished convert stage in {run_dir.root}")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(run_dir.stage("convert")))
        style = recipe.data.answer_style if recipe.data else "letter"
        task_dir = write_heldout_task(tokenizer, run_dir.root / "data" / "eval.jsonl", work / "tasks", style)
        include.append(str(task_dir))
        primary[HELDOUT] = primary_metric(style)
        heldout_hash = hashlib.sha256((task_dir / f"{HELDOUT}.jsonl").read_bytes()).hexdigest()[:16]
    results, timings = {}, {}
    scored = work / "variants"  # each variant's scores as soon as they exist: `--resume` after a kill keeps them
    scored.mkdir(exist_ok=True)
    for variant in progress.each_variant(variants_for(recipe, run_dir), timings):  # shows i/N and time
        key = _cache_key(
            variant,
            spec,
            tasks,
            recipe.model.name_or_path + recipe.model.dtype,
            schemes.quantization_id(recipe.qat),
            heldout_hash,
        )
        cached = _cache_dir() / f"{key}.json"
        cacheable = variant.path is None and (variant.control is None or variant.control_key is not None)
        # a converted model is identified by its finished stage (a re-run convert writes a new DONE)
        resume_key = [key, variant.path and (Path(variant.path) / "DONE").stat().st_mtime_ns]
        done = scored / f"{variant.name}.json"
        if resume and done.exists() and (saved := json.loads(done.read_text()))["key"] == resume_key:
            results[variant.name], timings[variant.name] = saved["result"], "resumed"
            log.info("eval %s: scored before the interruption", variant.name)
            continue

        with cache_lock(cached) if cacheable else contextlib.nullcontext():
            if cacheable and cached.exists():
                results[variant.name] = json.loads(cached.read_text())
                timings[variant.name] = "cached"
                log.info("eval %s: cached baseline %s", variant.name, cached)
            else:
                results[variant.name], timings[variant.name] = _evaluate_variant(
                    recipe, variant, tasks, spec, include, task_dir
                )
                if cacheable:
                    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(results[variant.name]))
                    tmp.replace(cached)
        write_json_atomic(done, {"key": resume_key, "result": results[variant.name]})
    out = {
        "tasks": tasks,
        "primary_metric": primary,
        "limit": spec.limit,
        "num_fewshot": spec.num_fewshot,
        "variants": results,
        "seconds": timings,
    }
    (work / "results.json").write_text(json.dumps(out, indent=2))
    return {"variants": list(results), "seconds": timings}
