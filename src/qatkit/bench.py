"""`qatkit bench`: what QAT costs in training and what convert buys at deployment, as ratios.

Every figure is a ratio measured inside one run (variants interleaved A, B, A, B, ... and medians
taken), because absolute times on a shared machine mean little. Sections:

- step_time        s/step of a LoRA training step (forward + backward + AdamW), plain vs QAT per
                   scheme and `qat.lora` mode, with and without the frozen-weight fake-quant cache,
                   plus a parity check that the cache leaves logits bit-identical;
- train_memory     peak memory of the same training step, each variant in its own process;
- checkpoint_size  converted checkpoint bytes vs bf16 and vs the scheme's theoretical floor;
- decode_latency   greedy `generate` speed and peak memory, converted vs original model;
- cli_startup      `python -m qatkit --help` vs `python -c pass`.

Heavy libraries are imported inside the functions. Worker processes run `python -m qatkit.bench
_memory|_decode <json>`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from qatkit.metrics import unique_param_count
from qatkit.pipeline import peak_rss_mb

DEFAULT_SCHEMES = ("int8-int4", "int8")
LORA_MODES = ("merged", "unmerged")
RESULT_PREFIX = "@@qatkit-bench "  # marks a worker's JSON line on stdout (libraries may print too)
SEED = 0

# a few sentences to train the --tiny model's tokenizer on (nothing is downloaded)
TINY_TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Quantization-aware training inserts fake quantizers into the forward pass.",
    "def add(a, b):\n    return a + b\n",
    "Water boils at 100 degrees Celsius at sea level.",
    "Question: What is 12 + 30?\nAnswer: 42",
    "A low-rank adapter adds B @ A to a frozen weight matrix.",
]


@dataclass(frozen=True)
class Settings:
    batch_size: int = 8
    seq_len: int = 96
    steps: int = 3  # timed steps per variant (after `warmup`), at least
    step_time_budget_s: float = 30.0  # more rounds (up to max_steps) while the timed rounds took less
    max_steps: int = 40
    warmup: int = 1
    lora_r: int = 16
    memory_steps: int = 2
    memory_all_variants: bool = True  # False: plain + each scheme in the CPU training default only
    parity_steps: int = 4
    parity_batch: int = 2
    parity_seq_len: int = 32
    prompt_len: int = 64
    new_tokens: int = 16
    decode_repeats: int = 3
    startup_repeats: int = 10


FULL = Settings()
QUICK = Settings(
    batch_size=4,
    seq_len=32,
    steps=3,
    step_time_budget_s=2.0,
    max_steps=20,
    lora_r=8,
    memory_steps=1,
    memory_all_variants=False,
    parity_steps=8,
    parity_seq_len=16,
    prompt_len=16,
    new_tokens=8,
    decode_repeats=2,
    startup_repeats=3,
)


# --- small helpers ------------------------------------------------------------------------------


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def _rss_mb() -> float:
    """Current resident set size of this process (Linux /proc), MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _dtype():
    from qatkit.loading import torch_dtype

    return torch_dtype("auto")  # what the hf backend trains in: fp32 on CPU, bf16 on CUDA


def _quiet() -> None:
    """Keep library progress bars and warnings out of the benchmark output."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "torchao", "peft", "torch", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _recipe(scheme: str, lora_mode: str, lora_r: int):
    from qatkit.recipe import validate_recipe

    return validate_recipe(
        {
            "name": "bench",
            "model": {"name_or_path": "bench/unused"},
            "qat": {"scheme": scheme, "lora": lora_mode},
            "lora": {"r": lora_r, "alpha": lora_r, "dropout": 0.0},
            "stages": ["convert"],
        },
        source="bench",
    )


def _random_ids(vocab_size: int, batch: int, seq_len: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    low = 3 if vocab_size > 3 else 0
    return torch.randint(low, vocab_size, (batch, seq_len), generator=g)


def variant_name(scheme: str | None, lora_mode: str | None = None, cache: bool | None = None) -> str:
    if scheme is None:
        return "plain"
    return f"{scheme}/{lora_mode}/{'cache' if cache else 'nocache'}"


@dataclass
class _Variant:
    name: str
    scheme: str | None
    lora_mode: str | None
    cache: bool | None
    model: object
    optimizer: object
    info: dict


def _build_variant(
    model_dir: str, scheme: str | None, lora_mode: str | None, cache: bool | None, lora_r: int, seed: int = SEED
) -> _Variant:
    """Load the model fresh and set it up exactly like the hf backend: fake quant first, then LoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    from qatkit import schemes
    from qatkit.backends.hf import attach_lora, prepare_for_qat

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_dtype())
    recipe = _recipe(scheme or DEFAULT_SCHEMES[0], lora_mode or "unmerged", lora_r)
    if scheme is not None:
        prepare_for_qat(recipe, model)
    torch.manual_seed(seed)  # LoRA init draws from the global RNG: same adapters in every variant
    model = attach_lora(recipe, model)
    cached = schemes.cache_frozen_weight_fake_quant(model) if cache else 0
    model.to(_device())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    info = {
        "fake_quantized_modules": len(schemes.fake_quantizers(model)),
        "lora_layers": sum(1 for n, _ in model.named_modules() if n.endswith("lora_A")),
        "cached_fake_quantizers": cached,
        "trainable_params": sum(p.numel() for p in params),
    }
    return _Variant(variant_name(scheme, lora_mode, cache), scheme, lora_mode, cache, model, optimizer, info)


def _train_step(v: _Variant, ids) -> float:
    loss = v.model(input_ids=ids, labels=ids).loss
    loss.backward()
    v.optimizer.step()
    v.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _variants(schemes: Sequence[str], lora_modes: Sequence[str], caches: Sequence[bool]) -> list[tuple]:
    return [(None, None, None)] + [(s, m, c) for s in schemes for m in lora_modes for c in caches]


# --- step time ----------------------------------------------------------------------------------


def step_time(
    model_dir: str | Path,
    schemes: Sequence[str] = DEFAULT_SCHEMES,
    lora_modes: Sequence[str] = LORA_MODES,
    batch_size: int = 8,
    seq_len: int = 96,
    steps: int = 4,
    lora_r: int = 16,
    *,
    warmup: int = 1,
    parity_steps: int = 4,
    parity_batch: int = 2,
    parity_seq_len: int = 32,
    threads: int | None = None,
    time_budget_s: float = 0.0,
    max_steps: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Seconds per LoRA training step, plain vs QAT, fq cache off/on; variants interleaved per round.

    Every variant is loaded fresh from `model_dir`, trains on the same random-token batch from the same
    LoRA init, and all of them are held in memory at once (1 + 4 × len(schemes) models with both
    LoRA modes). Round r runs every variant once, starting at a rotating offset; the figures are the
    median s/step and the median over rounds of the per-round ratio to plain LoRA. At least `steps`
    timed rounds run, more (up to `max_steps`) while the timed rounds took less than `time_budget_s`
    (a small model gets many rounds, a big one `steps`). `threads` sets torch's intra-op threads
    (default: torch's own choice).
    """
    import torch

    _quiet()
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    used_threads = torch.get_num_threads()
    model_dir = str(model_dir)
    specs = _variants(schemes, lora_modes, (False, True))
    variants = []
    for spec in specs:
        variants.append(_build_variant(model_dir, *spec, lora_r=lora_r))
        progress and progress(f"built {variants[-1].name}")
    vocab = variants[0].model.get_output_embeddings().weight.shape[0]
    ids = _random_ids(vocab, batch_size, seq_len, SEED).to(_device())
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    losses: dict[str, list[float]] = {v.name: [] for v in variants}
    timed = 0.0
    r = 0
    while r < warmup + steps or (timed < time_budget_s and r < warmup + max(steps, max_steps or 0)):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            _sync()
            t0 = time.perf_counter()
            loss = _train_step(v, ids)
            _sync()
            dt = time.perf_counter() - t0
            losses[v.name].append(loss)
            if r >= warmup:
                times[v.name].append(dt)
                timed += dt
        if r < warmup + steps:
            progress and progress(f"round {r + 1}/{warmup + steps}" + (" (warm-up)" if r < warmup else ""))
        r += 1
    infos = {v.name: v.info for v in variants}
    variants.clear()
    order.clear()
    v = None  # the loop variable holds a model too
    _free()

    plain = times["plain"]
    out: dict = {
        "settings": {
            "batch_size": batch_size,
            "seq_len": seq_len,
            "timed_steps": r - warmup,
            "warmup_steps": warmup,
            "lora_r": lora_r,
            "dtype": str(_dtype()).removeprefix("torch."),
            "device": str(_device()),
            "torch_threads": used_threads,
            "batch": "random token ids (seeded), labels = inputs",
        },
        "variants": {},
        "cache_speedup": {},
        "parity": {},
    }
    for (scheme, mode, cache), name in zip(specs, times, strict=True):
        t = times[name]
        out["variants"][name] = {
            "scheme": scheme,
            "lora_mode": mode,
            "fq_cache": cache,
            "median_s_per_step": _median(t),
            "times_s": t,
            "ratio_vs_plain": _median([a / b for a, b in zip(t, plain, strict=True)]),
            "ratio_of_medians_vs_plain": _median(t) / _median(plain),
            "loss_first": losses[name][0],
            "loss_last": losses[name][-1],
            **infos[name],
        }
    for scheme in schemes:
        for mode in lora_modes:
            off, on = times[variant_name(scheme, mode, False)], times[variant_name(scheme, mode, True)]
            out["cache_speedup"][f"{scheme}/{mode}"] = {
                "nocache_over_cache": _median([a / b for a, b in zip(off, on, strict=True)]),
                "median_s_nocache": _median(off),
                "median_s_cache": _median(on),
            }
    for scheme in schemes:
        for mode in lora_modes:
            out["parity"][f"{scheme}/{mode}"] = cache_parity(
                model_dir, scheme, mode, lora_r, parity_batch, parity_seq_len, parity_steps
            )
            progress and progress(f"parity {scheme}/{mode}")
    torch.set_num_threads(previous_threads)
    return out


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
        v = _build_variant(str(model_dir), scheme, lora_mode, cache, lora_r)
        vocab = v.model.get_output_embeddings().weight.shape[0]
        ids = _random_ids(vocab, batch_size, seq_len, SEED + 1).to(_device())
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
    _free()
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


def _free() -> None:
    """Release the memory of dropped models, back to the OS too (glibc keeps freed heap otherwise)."""
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --- training memory (one process per variant) ---------------------------------------------------


def _run_worker(kind: str, args: dict, timeout: float = 1800) -> dict:
    cmd = [sys.executable, "-m", "qatkit.bench", kind, json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"bench worker {kind} failed (exit {proc.returncode}): {' | '.join(tail)}")


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
    specs = _variants(schemes, lora_modes, caches)
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
        res = _run_worker("_memory", job)
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


def _preimport(model_dir: str) -> None:
    """Import everything a variant will need before the baseline RSS, so every variant starts equal
    (transformers imports the architecture's modeling code lazily, on first use)."""
    import peft  # noqa: F401
    from torchao.quantization import quantize_  # noqa: F401
    from torchao.quantization.qat import QATConfig  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with contextlib.suppress(KeyError, AttributeError):
        AutoModelForCausalLM._model_mapping[type(config)]  # imports the modeling module


def _memory_worker(args: dict) -> dict:
    import torch

    torch.set_num_threads(args["threads"])
    _quiet()
    _preimport(args["model_dir"])
    baseline = _rss_mb()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    v = _build_variant(args["model_dir"], args["scheme"], args["lora_mode"], args["cache"], args["lora_r"])
    after_setup = _rss_mb()
    vocab = v.model.get_output_embeddings().weight.shape[0]
    ids = _random_ids(vocab, args["batch_size"], args["seq_len"], SEED).to(_device())
    for _ in range(args["steps"]):
        _train_step(v, ids)
    _sync()
    peak = peak_rss_mb()
    return {
        "baseline_rss_mb": baseline,
        "after_setup_rss_mb": after_setup,
        "peak_rss_mb": peak,
        "peak_above_baseline_mb": peak - baseline,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


# --- checkpoint size ----------------------------------------------------------------------------


def save_converted(model_dir: str | Path, scheme_name: str, out: str | Path) -> dict:
    """PTQ through the convert stage's path (prepare + convert, attach the HF quantizer, save_pretrained).

    Returns what the size floor needs: the module plan, the parameter count and the dtype.
    """
    from transformers import AutoModelForCausalLM

    from qatkit import schemes

    _quiet()
    scheme = schemes.get_scheme(scheme_name)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_dtype())
    params = unique_param_count(model)
    plan = schemes.plan_modules(model, scheme)
    tied_out = model.get_output_embeddings().weight.numel() if plan.untie_embeddings else 0
    converted = schemes.quantize_ptq(model, scheme)
    schemes.attach_hf_quantizer(model, converted)
    model.save_pretrained(str(out))
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))
    except (OSError, ValueError):
        pass  # a model dir without a tokenizer still benchmarks; generate only needs token ids
    return {
        "params": params,
        "untied_lm_head_params": tied_out,
        "plan": plan,
        "dtype": str(model.dtype).removeprefix("torch."),
        "quantized_modules": len(converted),
    }


def _safetensors_breakdown(ckpt: Path) -> dict[str, dict]:
    """Bytes per role (quantized data, scales, zero points, other) and dtype, from the safetensors headers."""
    roles: dict[str, dict] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            leaf = name.rsplit(".", 1)[-1]
            role = (
                "quantized_data"
                if "qdata" in leaf
                else "scales"
                if "scale" in leaf
                else "zero_points"
                if "zero_point" in leaf
                else "other"
            )
            start, end = meta["data_offsets"]
            entry = roles.setdefault(role, {"bytes": 0, "tensors": 0, "dtypes": {}})
            entry["bytes"] += end - start
            entry["tensors"] += 1
            entry["dtypes"][meta["dtype"]] = entry["dtypes"].get(meta["dtype"], 0) + end - start
    return roles


def size_floor(plan, params: int, untied_lm_head_params: int, scheme_name: str, other_bytes: float = 2.0) -> dict:
    """The scheme's theoretical checkpoint size: quantized weights at their bit width, one 16-bit scale
    per group (or per output channel), no zero points (the schemes are symmetric), and every other
    parameter at `other_bytes` bytes (2: bf16)."""
    from qatkit.validate import WEIGHT_BITS

    quantized_params = weight_bytes = scales = 0
    for m in plan.quantized:
        rows, cols = m.shape
        quantized_params += rows * cols
        if m.kind == "embedding":  # IntxWeightOnly int8 per row
            weight_bytes += rows * cols * 8 / 8
            scales += rows
        else:
            weight_bytes += rows * cols * WEIGHT_BITS[scheme_name] / 8
            scales += rows * (math.ceil(cols / plan.group_size) if plan.group_size else 1)
    other = params + untied_lm_head_params - quantized_params
    return {
        "bytes": weight_bytes + scales * 2 + other * other_bytes,
        "quantized_weight_bytes": weight_bytes,
        "scale_bytes": scales * 2,
        "unquantized_params": other,
        "unquantized_bytes": other * other_bytes,
    }


def checkpoint_size(model_dir: str | Path, scheme: str, keep_dir: str | Path | None = None) -> dict:
    """Bytes on disk of the converted checkpoint vs bf16 (2 bytes/param) and vs the scheme's floor.

    The floor counts unquantized parameters at 16 bits; `floor_at_model_dtype` counts them (and the
    scales) at the dtype the checkpoint was saved in (fp32 on CPU), which is what convert writes here.
    """
    tmp = None
    if keep_dir is None:
        tmp = tempfile.mkdtemp(prefix="qatkit-bench-ckpt-")
        keep_dir = Path(tmp) / "ckpt"
    keep_dir = Path(keep_dir)
    try:
        info = save_converted(model_dir, scheme, keep_dir)
        weights = sum(f.stat().st_size for f in keep_dir.glob("*.safetensors"))
        total = sum(f.stat().st_size for f in keep_dir.rglob("*") if f.is_file())
        bf16 = info["params"] * 2
        floor = size_floor(info["plan"], info["params"], info["untied_lm_head_params"], scheme)
        dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(info["dtype"], 4)
        floor_dtype = size_floor(
            info["plan"], info["params"], info["untied_lm_head_params"], scheme, other_bytes=dtype_bytes
        )
        floor_dtype["bytes"] += floor_dtype["scale_bytes"] * (dtype_bytes / 2 - 1)  # scales at model dtype too
        return {
            "scheme": scheme,
            "saved_dtype": info["dtype"],
            "params": info["params"],
            "quantized_modules": info["quantized_modules"],
            "group_size": info["plan"].group_size,
            "weights_bytes": weights,
            "dir_bytes": total,
            "bf16_bytes": bf16,
            "floor_bytes": floor["bytes"],
            "floor": floor,
            "floor_at_model_dtype_bytes": floor_dtype["bytes"],
            "ratio_vs_bf16": weights / bf16,
            "ratio_vs_floor": weights / floor["bytes"],
            "ratio_vs_floor_at_model_dtype": weights / floor_dtype["bytes"],
            "breakdown": _safetensors_breakdown(keep_dir),
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --- decode latency (one persistent worker per model, interleaved) -------------------------------


class _DecodeWorker:
    def __init__(self, label: str, model_dir: str, prompt_len: int, new_tokens: int, threads: int, log_dir: Path):
        self.label = label
        self.stderr = open(log_dir / f"{label.replace('/', '_')}.stderr", "w+")  # noqa: SIM115
        args = {"model_dir": model_dir, "prompt_len": prompt_len, "new_tokens": new_tokens, "threads": threads}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qatkit.bench", "_decode", json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
        )

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX) :])
        self.proc.wait()
        self.stderr.seek(0)
        tail = self.stderr.read().strip().splitlines()[-5:]
        raise RuntimeError(f"decode worker {self.label} failed (exit {self.proc.returncode}): {' | '.join(tail)}")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def _decode_worker(args: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    _quiet()
    _preimport(args["model_dir"])  # torchao too: a converted checkpoint needs it
    baseline = _rss_mb()
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(args["model_dir"], dtype=_dtype()).to(_device()).eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = _random_ids(vocab, 1, args["prompt_len"], SEED + 2).to(_device())
    n = args["new_tokens"]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)

    def generate():
        _sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        _sync()
        return time.perf_counter() - t0, out[0, ids.shape[1] :].tolist()

    generate()  # warm-up
    print(RESULT_PREFIX + json.dumps({"ready": True, "after_load_rss_mb": _rss_mb()}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            seconds, tokens = generate()
            print(RESULT_PREFIX + json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)
        elif cmd == "quit":
            break
    peak = peak_rss_mb()
    print(
        RESULT_PREFIX
        + json.dumps(
            {
                "baseline_rss_mb": baseline,
                "peak_rss_mb": peak,
                "peak_above_baseline_mb": peak - baseline,
                "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            }
        ),
        flush=True,
    )


def decode_latency(
    model_dir: str | Path,
    scheme: str,
    prompt_len: int = 64,
    new_tokens: int = 32,
    *,
    repeats: int = 3,
    converted_dir: str | Path | None = None,
    threads: int | None = None,
) -> dict:
    """Greedy `generate` (batch 1, exactly `new_tokens` new tokens) of the converted checkpoint vs the
    original model: tokens/s, latency ratio, peak memory. See `decode_latency_many`."""
    dirs = {scheme: converted_dir} if converted_dir is not None else None
    return decode_latency_many(
        model_dir, [scheme], prompt_len, new_tokens, repeats=repeats, converted_dirs=dirs, threads=threads
    )[scheme]


def decode_latency_many(
    model_dir: str | Path,
    schemes: Sequence[str],
    prompt_len: int = 64,
    new_tokens: int = 32,
    *,
    repeats: int = 3,
    converted_dirs: dict[str, str | Path] | None = None,
    threads: int | None = None,
) -> dict[str, dict]:
    """Decode latency of several converted checkpoints against one original-model worker.

    Each model lives in its own worker process (so each has its own peak memory); the workers take
    turns, one generate each per round, the order rotating every round, and the median of `repeats`
    is reported; each scheme's latency ratio is the median of its per-round ratio to the original.
    Original: fp32 on CPU, bf16 on CUDA; converted: the checkpoint `save_converted` writes (what
    convert writes), reloaded with plain from_pretrained. The same random prompt in every worker.
    """
    tmp = Path(tempfile.mkdtemp(prefix="qatkit-bench-decode-"))
    workers: list[_DecodeWorker] = []
    labels = ["original", *schemes]
    try:
        dirs = dict(converted_dirs or {})
        for sc in schemes:
            if sc not in dirs:
                dirs[sc] = tmp / sc
                save_converted(model_dir, sc, dirs[sc])
        n = threads or 0  # 0: torch's default in the worker
        workers = [_DecodeWorker("original", str(model_dir), prompt_len, new_tokens, n, tmp)] + [
            _DecodeWorker(f"converted-{sc}", str(dirs[sc]), prompt_len, new_tokens, n, tmp) for sc in schemes
        ]
        ready = [w.read() for w in workers]  # they load (and warm up) concurrently
        runs: list[list[dict]] = [[] for _ in workers]
        for r in range(repeats):
            for i in range(len(workers)):
                j = (i + r) % len(workers)
                runs[j].append(workers[j].ask("run"))
        final = [w.ask("quit") for w in workers]
    finally:
        for w in workers:
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)

    def summary(i: int) -> dict:
        secs = [x["seconds"] for x in runs[i]]
        med = _median(secs)
        return {"median_s": med, "tokens_per_s": new_tokens / med, "times_s": secs, **ready[i], **final[i]}

    stats = {label: summary(i) for i, label in enumerate(labels)}
    orig = stats["original"]
    mem_key = "cuda_peak_mb" if orig.get("cuda_peak_mb") is not None else "peak_above_baseline_mb"
    out = {}
    for i, sc in enumerate(schemes, start=1):
        conv = stats[sc]
        out[sc] = {
            "scheme": sc,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "original": orig,
            "converted": conv,
            "torch_threads": threads or "default",
            "latency_ratio": _median([c["seconds"] / o["seconds"] for o, c in zip(runs[0], runs[i], strict=True)]),
            "tokens_per_s_ratio": conv["tokens_per_s"] / orig["tokens_per_s"],
            "memory_measure": mem_key,
            "memory_ratio": conv[mem_key] / orig[mem_key],
            "peak_rss_ratio": conv["peak_rss_mb"] / orig["peak_rss_mb"],
            "greedy_tokens_matching_original": sum(
                x == y for x, y in zip(runs[0][0]["tokens"], runs[i][0]["tokens"], strict=True)
            ),
        }
    return out


# --- CLI startup --------------------------------------------------------------------------------


def cli_startup(repeats: int = 10) -> dict:
    """Wall time of `python -m qatkit --help` vs `python -c pass` (interleaved, one warm-up each)."""
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -m qatkit --help": [sys.executable, "-m", "qatkit", "--help"],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    for r in range(repeats + 1):
        for name, cmd in commands.items() if r % 2 == 0 else reversed(commands.items()):
            t0 = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    base, cli = (times[k] for k in commands)
    return {
        "repeats": repeats,
        "python_s": _median(base),
        "qatkit_help_s": _median(cli),
        "times_s": times,
        "ratio": _median([c / b for b, c in zip(base, cli, strict=True)]),
        "overhead_s": _median(cli) - _median(base),
    }


# --- machine and load -----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    from qatkit.pipeline import package_versions

    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info = {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": mem_gb,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {k: v for k, v in package_versions().items() if v is not None},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return info


@dataclass
class _Snapshot:
    wall: float
    busy_s: float | None  # CPU time all processes used (from /proc/stat)
    steal_s: float | None
    own_s: float  # CPU time of this process and its finished children
    loadavg: tuple[float, float, float]


def _snapshot() -> _Snapshot:
    busy = steal = None
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal_t = (fields + [0] * 8)[:8]
        busy = (user + nice + system + irq + softirq + steal_t) / hz
        steal = steal_t / hz
    except (OSError, ValueError, IndexError):
        pass
    own = sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )
    return _Snapshot(time.time(), busy, steal, own, os.getloadavg())


def _load_between(a: _Snapshot, b: _Snapshot) -> dict:
    cores = os.cpu_count() or 1
    wall = b.wall - a.wall
    out: dict = {"seconds": round(wall, 1), "loadavg_end": [round(x, 2) for x in b.loadavg]}
    if a.busy_s is not None and b.busy_s is not None and wall > 0:
        others = max(0.0, (b.busy_s - a.busy_s) - (b.own_s - a.own_s))
        out["cpu_share_others"] = round(others / (wall * cores), 3)  # of all cores' time
        out["cpu_share_bench"] = round((b.own_s - a.own_s) / (wall * cores), 3)
        out["cpu_share_steal"] = round((b.steal_s - a.steal_s) / (wall * cores), 3)
    return out


def auto_threads(sample_s: float = 1.5) -> tuple[int, dict]:
    """torch threads for the timed sections: the cores other processes leave idle (at least 1).

    Measured over `sample_s` from /proc/stat. On a machine shared with other jobs, more intra-op threads
    than idle cores make OpenMP wait at every barrier for a descheduled thread: a step that takes 10 ms
    on one thread took 0.5-1.8 s on two (measured on a 2-core machine with another job using one core).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    a = _snapshot()
    time.sleep(sample_s)
    b = _snapshot()
    if a.busy_s is None or b.busy_s is None:
        return cores, {"policy": "auto", "cores": cores, "others_busy_cores": None}
    others = max(0.0, (b.busy_s - a.busy_s) - (b.own_s - a.own_s)) / (b.wall - a.wall)
    threads = max(1, min(cores, math.floor(cores - others + 0.1)))
    return threads, {"policy": "auto", "cores": cores, "others_busy_cores": round(others, 2)}


# --- everything --------------------------------------------------------------------------------


def run_all(
    model_dir: str | Path,
    out_dir: str | Path,
    quick: bool,
    *,
    schemes: Sequence[str] = DEFAULT_SCHEMES,
    model_label: str | None = None,
    command: str | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run every section on `model_dir` and write `out_dir/bench.json` and `out_dir/bench.md`.

    `threads`: torch threads of the timed sections (step time, decode); None picks `auto_threads()`.
    """
    _quiet()
    settings = QUICK if quick else FULL
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = str(model_dir)
    say = progress or (lambda msg: None)
    command = (
        command or f"python -c 'from qatkit.bench import run_all; run_all({model_dir!r}, {str(out_dir)!r}, {quick})'"
    )
    result: dict = {
        "qatkit_bench": 1,
        "command": command,
        "model": model_label or model_dir,
        "model_dir": model_dir,
        "quick": quick,
        "schemes": list(schemes),
        "settings": asdict(settings),
        "machine": machine(),
        "load": {"before": {"loadavg": [round(x, 2) for x in os.getloadavg()]}, "sections": {}},
    }
    if threads is None:
        threads, why = auto_threads()
    else:
        why = {"policy": "given"}
    result["threads"] = {"timed_sections": threads, **why}
    say(f"torch threads for the timed sections: {threads} ({why['policy']})")
    start = _snapshot()
    s = settings

    def section(name: str, fn: Callable[[], dict]) -> dict:
        say(f"▶ {name}")
        a = _snapshot()
        value = fn()
        result["load"]["sections"][name] = _load_between(a, _snapshot())
        return value

    result["cli_startup"] = section("cli_startup", lambda: cli_startup(s.startup_repeats))
    result["step_time"] = section(
        "step_time",
        lambda: step_time(
            model_dir,
            schemes,
            LORA_MODES,
            s.batch_size,
            s.seq_len,
            s.steps,
            s.lora_r,
            warmup=s.warmup,
            parity_steps=s.parity_steps,
            parity_batch=s.parity_batch,
            parity_seq_len=s.parity_seq_len,
            threads=threads,
            time_budget_s=s.step_time_budget_s,
            max_steps=s.max_steps,
            progress=lambda m: say(f"  step_time: {m}"),
        ),
    )
    result["train_memory"] = section(
        "train_memory",
        lambda: train_memory(
            model_dir,
            schemes,
            LORA_MODES if s.memory_all_variants else ("merged",),
            s.batch_size,
            s.seq_len,
            s.memory_steps,
            s.lora_r,
            caches=(False, True) if s.memory_all_variants else (True,),
            progress=lambda m: say(f"  train_memory: {m}"),
        ),
    )
    ckpt_root = Path(tempfile.mkdtemp(prefix="qatkit-bench-"))
    try:
        result["checkpoint_size"] = section(
            "checkpoint_size", lambda: {sc: checkpoint_size(model_dir, sc, ckpt_root / sc) for sc in schemes}
        )
        result["decode_latency"] = section(
            "decode_latency",
            lambda: decode_latency_many(
                model_dir,
                schemes,
                s.prompt_len,
                s.new_tokens,
                repeats=s.decode_repeats,
                converted_dirs={sc: ckpt_root / sc for sc in schemes},
                threads=threads,
            ),
        )
    finally:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    end = _snapshot()
    result["load"]["after"] = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
    result["load"]["whole_run"] = _load_between(start, end)
    result["load"]["shared_with_other_jobs"] = _shared(result["load"])
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "bench.md").write_text(render_markdown(result))
    return result


def _shared(load: dict) -> bool:
    """Other processes used a noticeable part of the CPU (> 5% overall or > 10% in a section); without
    /proc/stat, a 1-minute load average above half the cores before the run."""
    shares = [sec.get("cpu_share_others") for sec in (load["whole_run"], *load["sections"].values())]
    if shares[0] is None:
        return load["before"]["loadavg"][0] > 0.5 * (os.cpu_count() or 1)
    return shares[0] > 0.05 or any(x is not None and x > 0.10 for x in shares[1:])


# --- markdown --------------------------------------------------------------------------------------


def _size(b: float) -> str:
    if b >= 2**30:
        return f"{b / 2**30:.2f} GB"
    if b >= 2**20:
        return f"{b / 2**20:.1f} MB"
    return f"{b / 2**10:.0f} KB"


def _x(r: float) -> str:
    return f"{r:.2f}×"


def render_markdown(r: dict) -> str:
    m, load = r["machine"], r["load"]
    whole = load["whole_run"]
    lines = [
        f"# qatkit bench: {r['model']}",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gb']} GB RAM"
        + (f", {m['cuda']}" if m["cuda"] else ", no GPU")
        + f"; torch {m['versions'].get('torch')}, torchao {m['versions'].get('torchao')}, "
        f"transformers {m['versions'].get('transformers')}, peft {m['versions'].get('peft')}; {m['date']}.",
        "",
        f"Load average (1/5/15 min) before: {load['before']['loadavg']}, after: {load['after']['loadavg']}."
        + (
            f" Other processes used {100 * whole['cpu_share_others']:.0f}% of the machine's CPU time during the run "
            f"(this benchmark {100 * whole['cpu_share_bench']:.0f}%)."
            if "cpu_share_others" in whole
            else ""
        ),
        "",
    ]
    th = r.get("threads", {})
    if th:
        why = (
            f"auto: other processes kept {th['others_busy_cores']} of {th['cores']} cores busy just before the run"
            if th.get("policy") == "auto" and th.get("others_busy_cores") is not None
            else th.get("policy", "")
        )
        lines += [f"Timed sections (step time, decode) ran with {th['timed_sections']} torch thread(s) ({why}).", ""]
    if load["shared_with_other_jobs"]:
        lines += [
            "**The machine was shared with other jobs during this run**, so absolute times are noisy and "
            "inflated; the ratios below come from variants interleaved within this one run (A, B, A, B, ...; "
            "medians), which is what to compare.",
            "",
        ]
    lines += [
        "All ratios are measured inside this run. ×plain / ×original: median over rounds of the per-round "
        "ratio (> 1 means slower or bigger).",
        "",
    ]
    st = r["step_time"]
    ss = st["settings"]
    lines += [
        "## Training step time (LoRA, forward + backward + AdamW)",
        "",
        f"batch {ss['batch_size']} × {ss['seq_len']} tokens, LoRA r={ss['lora_r']} on all linear projections, "
        f"{ss['dtype']} on {ss['device']}, {ss['timed_steps']} timed steps per variant after {ss['warmup_steps']} "
        f"warm-up, {ss['torch_threads']} torch threads. fq cache: "
        "`schemes.cache_frozen_weight_fake_quant` (fq(W) of frozen weights computed once).",
        "",
        "| variant | qat.lora | fq cache | s/step (median) | min–max | × plain | cache on = off (logits) |",
        "|---|---|---|---:|---|---:|---|",
    ]
    for v in st["variants"].values():
        par = st["parity"].get(f"{v['scheme']}/{v['lora_mode']}") if v["scheme"] else None
        lines.append(
            f"| {v['scheme'] or 'plain LoRA'} | {v['lora_mode'] or '—'} | "
            f"{'—' if v['fq_cache'] is None else 'on' if v['fq_cache'] else 'off'} | "
            f"{v['median_s_per_step']:.3f} | {min(v['times_s']):.3f}–{max(v['times_s']):.3f} | "
            f"{_x(v['ratio_vs_plain'])} | "
            f"{'—' if par is None else 'identical' if par['identical'] else '**DIFFERENT**'} |"
        )
    lines += ["", "| scheme / qat.lora | s/step cache off | s/step cache on | off / on |", "|---|---:|---:|---:|"]
    for k, c in st["cache_speedup"].items():
        lines.append(
            f"| {k} | {c['median_s_nocache']:.3f} | {c['median_s_cache']:.3f} | {_x(c['nocache_over_cache'])} |"
        )
    lines += [
        "",
        "Parity (fq cache on vs off, same start, torch.equal on the logits of the training forward and of an "
        "eval forward — `model.eval()` + `no_grad` — before every step and after the last):",
        "",
    ]
    for k, p in st["parity"].items():
        lines.append(
            f"- {k}: {'identical' if p['identical'] else 'DIFFERENT'} over {p['forwards_compared']} forwards "
            f"(training forward {'identical' if p['train_forward_identical'] else 'different'}, eval forward "
            f"{'identical' if p['eval_forward_identical'] else 'different'}; max |Δ| {p['max_abs_diff']:.3g}; "
            f"{p['cached_fake_quantizers']} fake quantizers wrapped)"
        )
    tm = r["train_memory"]
    ms = tm["settings"]
    measure = "CUDA max_memory_allocated" if ms["measure"] == "cuda_peak_mb" else "peak RSS above the post-import RSS"
    lines += [
        "",
        "## Training memory",
        "",
        f"One fresh process per variant: load, set up, {ms['steps']} training step(s) at the same batch; "
        f"measure: {measure} (peak RSS = VmHWM of the whole process).",
        "",
        "| variant | qat.lora | fq cache | peak RSS MB | above baseline MB | × plain |",
        "|---|---|---|---:|---:|---:|",
    ]
    for v in tm["variants"].values():
        lines.append(
            f"| {v['scheme'] or 'plain LoRA'} | {v['lora_mode'] or '—'} | "
            f"{'—' if v['fq_cache'] is None else 'on' if v['fq_cache'] else 'off'} | {v['peak_rss_mb']:,.0f} | "
            f"{v['peak_above_baseline_mb']:,.0f} | {_x(v['ratio_vs_plain'])} |"
        )
    lines += [
        "",
        "## Converted checkpoint size",
        "",
        "PTQ through the convert stage's path (`schemes.quantize_ptq` + `attach_hf_quantizer` + "
        "`save_pretrained`). bf16 = 2 bytes/parameter of the original. Floor = quantized weights at the "
        "scheme's bit width + one 16-bit scale per group/channel + every other parameter at 16 bits; "
        "floor@dtype counts the unquantized parameters and scales at the saved dtype.",
        "",
        "| scheme | saved dtype | checkpoint | bf16 | floor | floor@dtype | × bf16 | × floor | × floor@dtype |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in r["checkpoint_size"].values():
        lines.append(
            f"| {c['scheme']} | {c['saved_dtype']} | {_size(c['weights_bytes'])} | {_size(c['bf16_bytes'])} | "
            f"{_size(c['floor_bytes'])} | {_size(c['floor_at_model_dtype_bytes'])} | {_x(c['ratio_vs_bf16'])} | "
            f"{_x(c['ratio_vs_floor'])} | {_x(c['ratio_vs_floor_at_model_dtype'])} |"
        )
    lines += ["", "Where the bytes go (from the safetensors headers):", ""]
    for c in r["checkpoint_size"].values():
        parts = ", ".join(
            f"{role} {_size(b['bytes'])} ({', '.join(f'{d} {_size(n)}' for d, n in b['dtypes'].items())})"
            for role, b in c["breakdown"].items()
        )
        lines.append(f"- {c['scheme']}: {parts}")
    lines += [
        "",
        "## Decode latency (greedy generate, batch 1)",
        "",
        "Original and converted checkpoint each in its own worker process, taking turns; "
        "latency ratio = converted s / original s per round (median).",
        "",
        "| scheme | prompt + new tokens | original tok/s | converted tok/s | latency × original | "
        "peak RSS MB orig / conv | memory × original | greedy tokens = original |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for d in r["decode_latency"].values():
        lines.append(
            f"| {d['scheme']} | {d['prompt_len']} + {d['new_tokens']} | {d['original']['tokens_per_s']:.1f} | "
            f"{d['converted']['tokens_per_s']:.1f} | {_x(d['latency_ratio'])} | "
            f"{d['original']['peak_rss_mb']:,.0f} / {d['converted']['peak_rss_mb']:,.0f} | "
            f"{_x(d['memory_ratio'])} | {d['greedy_tokens_matching_original']}/{d['new_tokens']} |"
        )
    mem_note = (
        "CUDA max_memory_allocated"
        if next(iter(r["decode_latency"].values()), {}).get("memory_measure") == "cuda_peak_mb"
        else "peak RSS above the post-import RSS"
    )
    cs = r["cli_startup"]
    lines += [
        "",
        f"Memory ratio: {mem_note}.",
        "",
        "## CLI start-up",
        "",
        f"`python -m qatkit --help` {cs['qatkit_help_s'] * 1000:.0f} ms vs `python -c pass` "
        f"{cs['python_s'] * 1000:.0f} ms (median of {cs['repeats']}, interleaved): {_x(cs['ratio'])}, "
        f"+{cs['overhead_s'] * 1000:.0f} ms.",
        "",
        "## Load during each section",
        "",
        "| section | seconds | CPU share of other processes | CPU share of this benchmark | load average after |",
        "|---|---:|---:|---:|---|",
    ]
    for name, sec in load["sections"].items():
        others = f"{100 * sec['cpu_share_others']:.0f}%" if "cpu_share_others" in sec else "n/a"
        own = f"{100 * sec['cpu_share_bench']:.0f}%" if "cpu_share_bench" in sec else "n/a"
        lines.append(f"| {name} | {sec['seconds']:.0f} | {others} | {own} | {sec['loadavg_end']} |")
    lines.append("")
    return "\n".join(lines)


# --- worker entry point ----------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("_memory", "_decode"):
        print("usage: python -m qatkit.bench _memory|_decode '<json args>'  (internal; use `qatkit bench`)")
        return 2
    args = json.loads(argv[1])
    if argv[0] == "_memory":
        print(RESULT_PREFIX + json.dumps(_memory_worker(args)), flush=True)
    else:
        _decode_worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
