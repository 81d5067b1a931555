"""Training cost of QAT: step time (variants interleaved), fq-cache parity, peak memory per variant."""

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qatkit.bench.common import (
    DEFAULT_SCHEMES,
    FULL,
    LORA_MODES,
    SEED,
    Settings,
    build_variant,
    device,
    free_memory,
    median,
    preimport,
    quiet,
    random_ids,
    rss_mb,
    run_worker,
    sync,
    train_dtype,
    train_step,
    variant_name,
    variant_specs,
)
from qatkit.core.env import peak_rss_mb

# --- step time ----------------------------------------------------------------------------------


def step_time(
    model_dir: str | Path,
    schemes: Sequence[str] = DEFAULT_SCHEMES,
    lora_modes: Sequence[str] = LORA_MODES,
    settings: Settings = FULL,
    *,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Seconds per LoRA training step, plain vs QAT, fq cache off/on; variants interleaved per round.

    Every variant is loaded fresh from `model_dir`, trains on the same random-token batch from the same
    LoRA init, and all of them are held in memory at once (1 + 4 × len(schemes) models with both
    LoRA modes). Round r runs every variant once, starting at a rotating offset; the figures are the
    median s/step and the median over rounds of the per-round ratio to plain LoRA. At least
    `settings.steps` timed rounds run, more (up to `settings.max_steps`) while the timed rounds took
    less than `settings.step_time_budget_s` (a small model gets many rounds, a big one `steps`), after
    `settings.warmup` untimed ones; then `cache_parity` per scheme and mode. `threads` sets torch's
    intra-op threads (default: torch's own choice).
    """
    quiet()
    say = progress or (lambda msg: None)
    model_dir = str(model_dir)
    specs = variant_specs(schemes, lora_modes, (False, True))
    with _torch_threads(threads) as used_threads:
        timing = _time_variants(model_dir, specs, settings, say)
        free_memory()  # the models went with _time_variants' frame
        return {
            "settings": _step_time_settings(settings, timing, used_threads),
            "variants": _variant_figures(specs, timing),
            "cache_speedup": _cache_speedups(schemes, lora_modes, timing.times),
            "parity": _parity_all(model_dir, schemes, lora_modes, settings, say),
        }


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[int]:
    """torch's intra-op threads set to `threads` (None: left as they are) inside; yields the number in use."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class _Timing:
    """What the interleaved rounds measured: seconds and losses per variant name (in spec order), its setup info."""

    times: dict[str, list[float]]
    losses: dict[str, list[float]]
    infos: dict[str, dict]
    rounds: int  # warm-up rounds included


def _time_variants(model_dir: str, specs: list[tuple], s: Settings, say: Callable[[str], None]) -> _Timing:
    """Build every variant, then run the rounds: each variant one training step per round, the order rotating.

    The models live only in this frame: they are dropped when it returns (the caller frees the memory)."""
    variants = []
    for spec in specs:
        variants.append(build_variant(model_dir, *spec, lora_r=s.lora_r))
        say(f"built {variants[-1].name}")
    vocab = variants[0].model.get_output_embeddings().weight.shape[0]
    ids = random_ids(vocab, s.batch_size, s.seq_len, SEED).to(device())
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    losses: dict[str, list[float]] = {v.name: [] for v in variants}
    timed = 0.0
    r = 0
    while r < s.warmup + s.steps or (timed < s.step_time_budget_s and r < s.warmup + max(s.steps, s.max_steps)):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            sync()
            t0 = time.perf_counter()
            loss = train_step(v, ids)
            sync()
            dt = time.perf_counter() - t0
            losses[v.name].append(loss)
            if r >= s.warmup:
                times[v.name].append(dt)
                timed += dt
        if r < s.warmup + s.steps:
            say(f"round {r + 1}/{s.warmup + s.steps}" + (" (warm-up)" if r < s.warmup else ""))
        r += 1
    return _Timing(times, losses, {v.name: v.info for v in variants}, r)


def _step_time_settings(s: Settings, timing: _Timing, used_threads: int) -> dict:
    return {
        "batch_size": s.batch_size,
        "seq_len": s.seq_len,
        "timed_steps": timing.rounds - s.warmup,
        "warmup_steps": s.warmup,
        "lora_r": s.lora_r,
        "dtype": str(train_dtype()).removeprefix("torch."),
        "device": str(device()),
        "torch_threads": used_threads,
        "batch": "random token ids (seeded), labels = inputs",
    }


def _variant_figures(specs: list[tuple], timing: _Timing) -> dict:
    """Per variant: median s/step, the times, the median per-round ratio to plain LoRA, losses, setup info."""
    plain = timing.times["plain"]
    figures = {}
    for (scheme, mode, cache), name in zip(specs, timing.times, strict=True):
        t = timing.times[name]
        figures[name] = {
            "scheme": scheme,
            "lora_mode": mode,
            "fq_cache": cache,
            "median_s_per_step": median(t),
            "times_s": t,
            "ratio_vs_plain": median([a / b for a, b in zip(t, plain, strict=True)]),
            "ratio_of_medians_vs_plain": median(t) / median(plain),
            "loss_first": timing.losses[name][0],
            "loss_last": timing.losses[name][-1],
            **timing.infos[name],
        }
    return figures


def _cache_speedups(schemes: Sequence[str], lora_modes: Sequence[str], times: dict[str, list[float]]) -> dict:
    """Per scheme and mode: the median per-round ratio of s/step with the fq cache off to on."""
    speedups = {}
    for scheme in schemes:
        for mode in lora_modes:
            off, on = times[variant_name(scheme, mode, False)], times[variant_name(scheme, mode, True)]
            speedups[f"{scheme}/{mode}"] = {
                "nocache_over_cache": median([a / b for a, b in zip(off, on, strict=True)]),
                "median_s_nocache": median(off),
                "median_s_cache": median(on),
            }
    return speedups


def _parity_all(
    model_dir: str, schemes: Sequence[str], lora_modes: Sequence[str], s: Settings, say: Callable[[str], None]
) -> dict:
    parity = {}
    for scheme in schemes:
        for mode in lora_modes:
            parity[f"{scheme}/{mode}"] = cache_parity(
                model_dir, scheme, mode, s.lora_r, s.parity_batch, s.parity_seq_len, s.parity_steps
            )
            say(f"parity {scheme}/{mode}")
    return parity


def cache_parity(
    model_dir: str | Path, scheme: str, lora_mode: str, lora_r: int, batch_size: int, seq_len: int, steps: int
) -> dict:
    """fq cache on vs off from the same start: logits must be bit-identical (torch.equal).

    Each model in turn runs `steps` times: an eval forward (model.eval() + no_grad, like an evaluation
    during training), then a training forward + AdamW step; a last eval forward follows. The cached
    model's logits are then compared with the uncached model's, forward by forward. (Each model runs
    its whole sequence alone, so the allocation pattern is that of a real training run.)
    """
    import torch

    def run(cache: bool) -> tuple[list, list, int]:
        v = build_variant(str(model_dir), scheme, lora_mode, cache, lora_r)
        vocab = v.model.get_output_embeddings().weight.shape[0]
        ids = random_ids(vocab, batch_size, seq_len, SEED + 1).to(device())
        evals, trains = [], []

        def eval_forward() -> None:
            v.model.eval()
            with torch.no_grad():
                evals.append(v.model(input_ids=ids).logits)
            v.model.train()

        for _ in range(steps):
            eval_forward()
            out = v.model(input_ids=ids, labels=ids)
            out.loss.backward()
            v.optimizer.step()
            v.optimizer.zero_grad(set_to_none=True)
            trains.append(out.logits.detach())
        eval_forward()
        return evals, trains, v.info["cached_fake_quantizers"]

    eval_on, train_on, cached = run(True)
    eval_off, train_off, _ = run(False)
    free_memory()
    eval_equal = [torch.equal(x, y) for x, y in zip(eval_on, eval_off, strict=True)]
    train_equal = [torch.equal(x, y) for x, y in zip(train_on, train_off, strict=True)]
    max_diff = max(
        (x.double() - y.double()).abs().max().item()
        for x, y in zip(eval_on + train_on, eval_off + train_off, strict=True)
    )
    return {
        "identical": all(train_equal) and all(eval_equal),
        "train_forward_identical": all(train_equal),
        "eval_forward_identical": all(eval_equal),
        "eval_forwards_different": eval_equal.count(False),
        "forwards_compared": len(train_equal) + len(eval_equal),
        "max_abs_diff": max_diff,
        "cached_fake_quantizers": cached,
    }


# --- training memory (one process per variant) ---------------------------------------------------


def train_memory(
    model_dir: str | Path,
    schemes: Sequence[str] = DEFAULT_SCHEMES,
    lora_modes: Sequence[str] = LORA_MODES,
    batch_size: int = 8,
    seq_len: int = 96,
    steps: int = 2,
    lora_r: int = 16,
    *,
    caches: Sequence[bool] = (False, True),
    parallel: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Peak memory of load + setup + `steps` training steps, each variant in a fresh process.

    On CPU: peak RSS (process-wide and monotonic, hence one process per variant) and the part above
    the RSS right after the imports; on CUDA: torch.cuda.max_memory_allocated. Memory does not depend
    on timing, so up to `parallel` processes run at once (torch threads split between them).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parallel = parallel or min(2, cores)
    threads = max(1, cores // parallel)
    specs = variant_specs(schemes, lora_modes, caches)
    jobs = [
        {
            "model_dir": str(model_dir),
            "scheme": s,
            "lora_mode": m,
            "cache": c,
            "lora_r": lora_r,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "steps": steps,
            "threads": threads,
        }
        for s, m, c in specs
    ]

    def one(job: dict) -> dict:
        res = run_worker("_memory", job)
        progress and progress(f"memory {variant_name(job['scheme'], job['lora_mode'], job['cache'])}")
        return res

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        results = list(pool.map(one, jobs))
    key = "cuda_peak_mb" if results[0].get("cuda_peak_mb") is not None else "peak_above_baseline_mb"
    plain = results[0]
    out = {
        "settings": {
            "batch_size": batch_size,
            "seq_len": seq_len,
            "steps": steps,
            "lora_r": lora_r,
            "processes_in_parallel": parallel,
            "torch_threads_per_process": threads,
            "measure": key,
        },
        "variants": {},
    }
    for (s, m, c), res in zip(specs, results, strict=True):
        out["variants"][variant_name(s, m, c)] = {
            "scheme": s,
            "lora_mode": m,
            "fq_cache": c,
            **res,
            "ratio_vs_plain": res[key] / plain[key],
            "peak_rss_ratio_vs_plain": res["peak_rss_mb"] / plain["peak_rss_mb"],
        }
    return out


def memory_worker(args: dict) -> dict:
    import torch

    torch.set_num_threads(args["threads"])
    quiet()
    preimport(args["model_dir"])
    baseline = rss_mb()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    v = build_variant(args["model_dir"], args["scheme"], args["lora_mode"], args["cache"], args["lora_r"])
    after_setup = rss_mb()
    vocab = v.model.get_output_embeddings().weight.shape[0]
    ids = random_ids(vocab, args["batch_size"], args["seq_len"], SEED).to(device())
    for _ in range(args["steps"]):
        train_step(v, ids)
    sync()
    peak = peak_rss_mb()
    return {
        "baseline_rss_mb": baseline,
        "after_setup_rss_mb": after_setup,
        "peak_rss_mb": peak,
        "peak_above_baseline_mb": peak - baseline,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }
