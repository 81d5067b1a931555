"""eval stage: the converted model and its baselines (bf16 original, PTQ of the original, the no-QAT fine-tune and
its PTQ) scored on the same tasks and items, with lm-eval (`evaluation.lmeval`) and gold-answer / text NLL.

Baselines that do not depend on this run's training are cached (keyed by everything that determines their
scores), and each variant's scores are kept in the stage's work dir as soon as they exist, so `--resume` after a
kill scores only the rest.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from qatkit.core import progress
from qatkit.core.cache import cache_key, cache_lock, cache_root, code_fingerprint
from qatkit.core.errors import RecipeError
from qatkit.core.io import DONE, read_json, read_jsonl, write_json_atomic
from qatkit.evaluation import variants as variant_info
from qatkit.evaluation.lmeval import HELDOUT, check_tasks_available, evaluate_model, primary_metric, write_heldout_task
from qatkit.evaluation.nll import heldout_gold_nll, load_texts, text_nll
from qatkit.models.assembly import load_finetuned
from qatkit.models.loading import load_model_and_tokenizer
from qatkit.quant.apply import quantize_ptq
from qatkit.recipe import EvalSpec, Recipe
from qatkit.run.layout import EvalDir
from qatkit.run.records import EvalResults, TrainSummary
from qatkit.run.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalTarget:
    """How to build one variant's model (see `evaluation.variants` for the names)."""

    name: str  # "qat", "bf16", "ptq", ...
    path: str | None  # checkpoint dir to load, or None for the recipe's base model
    quantize: bool = False  # apply the scheme as PTQ after loading
    control: str | None = None  # what the no-QAT control run trained: a LoRA adapter to merge, or full weights
    control_key: str | None = None  # identity of that run (its cache key), for caching

    @property
    def cacheable(self) -> bool:
        """Scores that do not depend on this run dir (a converted model is this run's own)."""
        return self.path is None and (self.control is None or self.control_key is not None)


@dataclass(frozen=True)
class HeldoutTask:
    task_dir: Path
    metric: str
    digest: str  # of the items as scored: part of every cache key


def targets_for(recipe: Recipe, run_dir: RunDir) -> list[EvalTarget]:
    """The converted model first ("qat" when finetuned, else it is the PTQ model), then the fine-tune's baselines
    (ft-ptq, ft-bf16), then the base model's (ptq, bf16): what the run is for is scored first."""
    finetuned = "finetune" in recipe.stages
    out = []
    if "convert" in recipe.stages:
        out.append(EvalTarget("qat" if finetuned else "ptq", str(run_dir.convert.root)))
    if finetuned:
        control = str(run_dir.finetune.control.trained(recipe.train.full_finetuning))
        summary = TrainSummary.load(run_dir.finetune.train_summary)
        control_key = (summary.control or {}).get("cache_key") if summary else None
        if "ft-ptq" in recipe.eval.baselines:
            out.append(EvalTarget("ft-ptq", None, quantize=True, control=control, control_key=control_key))
        if "ft-bf16" in recipe.eval.baselines:
            out.append(EvalTarget("ft-bf16", None, control=control, control_key=control_key))
        if "ptq" in recipe.eval.baselines:
            out.append(EvalTarget("ptq", None, quantize=True))
    if "bf16" in recipe.eval.baselines:
        out.append(EvalTarget("bf16", None))
    return out


def _cache_key(target: EvalTarget, recipe: Recipe, heldout_digest: str) -> str:
    spec = recipe.eval
    text = [spec.text_path, spec.text_field, spec.text_docs, spec.text_max_tokens] if spec.text_path else None
    return cache_key(
        [
            "v3",  # v3: per-item scores
            target.name,
            recipe.model.name_or_path + recipe.model.dtype,
            recipe.quant.cache_id if target.quantize else None,  # bf16 / ft-bf16 do not depend on the scheme
            list(spec.tasks),
            spec.limit,
            spec.num_fewshot,
            spec.include_path,
            heldout_digest,
            text,
            target.control_key,
            code_fingerprint(),
        ]
    )


def _load(recipe: Recipe, target: EvalTarget):
    if target.control:
        model, tokenizer = load_finetuned(recipe, target.control)
    else:
        model, tokenizer = load_model_and_tokenizer(recipe.model, path=target.path)
    if target.quantize:
        quantize_ptq(model, recipe.quant)
    return model.eval(), tokenizer


def _score(recipe: Recipe, target: EvalTarget, include: list[str], heldout: HeldoutTask | None):
    """Scores of one variant (tasks, gold-answer NLL, held-out text NLL) and the seconds they took."""
    spec: EvalSpec = recipe.eval
    t0 = time.time()
    model, tokenizer = _load(recipe, target)
    scores = evaluate_model(model, tokenizer, list(spec.tasks), spec, include, seed=recipe.train.seed)
    if HELDOUT in scores:
        docs = read_jsonl(heldout.task_dir / f"{HELDOUT}.jsonl")[: spec.limit]
        scores[HELDOUT]["gold_nll"] = heldout_gold_nll(model, tokenizer, docs)
    result = {"dtype": str(model.dtype).removeprefix("torch."), "tasks": scores}
    if spec.text_path:
        result["text_nll"] = text_nll(model, tokenizer, load_texts(spec), spec.text_max_tokens)
    del model
    gc.collect()
    return result, round(time.time() - t0, 2)


def _heldout_task(recipe: Recipe, run_dir: RunDir, files: EvalDir) -> HeldoutTask:
    """The held-out split as a local lm-eval task, prompted with the converted model's tokenizer."""
    from transformers import AutoTokenizer

    if not run_dir.is_done("convert"):
        raise RecipeError(f"eval of '{HELDOUT}' needs a finished convert stage in {run_dir.root}")
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir.convert.root))
    style = recipe.data.answer_style if recipe.data else "letter"
    task_dir = write_heldout_task(tokenizer, run_dir.eval_data, files.tasks, style)
    digest = hashlib.sha256((task_dir / f"{HELDOUT}.jsonl").read_bytes()).hexdigest()[:16]
    return HeldoutTask(task_dir, primary_metric(style), digest)


def _scores(recipe: Recipe, target: EvalTarget, include: list[str], heldout, resume_key, files: EvalDir, resume):
    """One variant's scores: kept from before an interruption, from the cache, or computed (and then cached)."""
    done = files.variants / f"{target.name}.json"
    saved = read_json(done) if resume else None
    if saved and saved["key"] == resume_key:
        log.info("eval %s: scored before the interruption", target.name)
        return saved["result"], "resumed"
    cached = cache_root() / "eval" / f"{resume_key[0]}.json"
    with cache_lock(cached) if target.cacheable else contextlib.nullcontext():
        if target.cacheable and cached.exists():
            log.info("eval %s: cached baseline %s", target.name, cached)
            result, seconds = read_json(cached), "cached"
        else:
            result, seconds = _score(recipe, target, include, heldout)
            if target.cacheable:
                write_json_atomic(cached, result, indent=None)
    write_json_atomic(done, {"key": resume_key, "result": result})
    return result, seconds


def run(recipe: Recipe, run_dir: RunDir, work: Path, resume: bool = False) -> dict:
    spec = recipe.eval
    include = [spec.include_path] if spec.include_path else []
    check_tasks_available(list(spec.tasks), include)
    files = EvalDir(work)
    heldout = _heldout_task(recipe, run_dir, files) if HELDOUT in spec.tasks else None
    if heldout:
        include.append(str(heldout.task_dir))
    files.variants.mkdir(exist_ok=True)
    results, timings = {}, {}
    for target in progress.each_variant(targets_for(recipe, run_dir), timings, variant_info.label):  # i/N, time
        key = _cache_key(target, recipe, heldout.digest if heldout else "")
        # a converted model is identified by its finished stage (a re-run convert writes a new DONE)
        resume_key = [key, target.path and (Path(target.path) / DONE).stat().st_mtime_ns]
        results[target.name], timings[target.name] = _scores(
            recipe, target, include, heldout, resume_key, files, resume
        )
    EvalResults(
        tasks=list(spec.tasks),
        primary_metric={HELDOUT: heldout.metric} if heldout else {},
        limit=spec.limit,
        num_fewshot=spec.num_fewshot,
        variants=results,
        seconds=timings,
    ).save(files.results)
    return {"variants": list(results), "seconds": timings}
