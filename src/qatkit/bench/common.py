"""Shared pieces of the benchmarks: settings, model variants, workers, small helpers."""

import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qatkit.core.env import proc_status_mb
from qatkit.core.errors import RecipeError
from qatkit.core.metrics import unique_param_count

DEFAULT_SCHEMES = ("int8-int4", "int8")
LORA_MODES = ("merged", "unmerged")
SECTIONS = ("cli_startup", "step_time", "train_memory", "checkpoint_size", "decode_latency")
# only when asked for (--sections): they need an engine installed (the llamacpp / executorch extras) and, for
# executorch, minutes of lowering
OPTIONAL_SECTIONS = ("gguf", "executorch")

RESULT_PREFIX = "@@qatkit-bench "  # marks a worker's JSON line on stdout (libraries may print too)
SEED = 0
SCORE_BATCH = 8  # prompts per forward when timing log-likelihood scoring (the eval stage's workload)


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
    step_time_budget_s: float = 600.0  # more rounds (up to max_steps) while the timed rounds took less
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


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc), MB."""
    rss = proc_status_mb("VmRSS")
    return float("nan") if rss is None else rss


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_kwargs() -> dict:
    """from_pretrained arguments for the benchmarked models: the training dtype, loaded straight onto the GPU when
    there is one (where the CUDA-only schemes, int4 and fp8-int4, convert and load)."""
    import torch

    return {"dtype": train_dtype(), **({"device_map": "cuda"} if torch.cuda.is_available() else {})}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_dtype():
    from qatkit.models.loading import torch_dtype

    return torch_dtype("auto")  # what the hf backend trains in: fp32 on CPU, bf16 on CUDA


def quiet() -> None:
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


def bench_recipe(scheme: str, lora_mode: str, lora_r: int):
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


def build_random_model(config_file: str | Path, out: Path, seed: int = SEED) -> int:
    """Save a model of the architecture in `config_file` (a config.json) with seeded random weights to `out`, in the
    dtype the benchmark trains in: speed, memory and checkpoint size do not depend on the values. Built on the GPU
    when there is one (an 8B model initializes in seconds there). Returns the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config_dict = json.loads(Path(config_file).read_text())
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    except (OSError, ValueError, KeyError) as e:
        raise RecipeError(f"--arch {config_file}: not a model config.json ({type(e).__name__}: {e})") from None
    torch.manual_seed(seed)
    with torch.device(device()):
        model = AutoModelForCausalLM.from_config(config, dtype=train_dtype())
    params = unique_param_count(model)
    model.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the timed sections start with the GPU to themselves
    return params


def random_ids(vocab_size: int, batch: int, seq_len: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    low = 3 if vocab_size > 3 else 0
    return torch.randint(low, vocab_size, (batch, seq_len), generator=g)


def variant_name(scheme: str | None, lora_mode: str | None = None, cache: bool | None = None) -> str:
    if scheme is None:
        return "plain"
    return f"{scheme}/{lora_mode}/{'cache' if cache else 'nocache'}"


@dataclass
class TrainVariant:
    name: str
    scheme: str | None
    lora_mode: str | None
    cache: bool | None
    model: object
    optimizer: object
    info: dict


def build_variant(
    model_dir: str, scheme: str | None, lora_mode: str | None, cache: bool | None, lora_r: int, seed: int = SEED
) -> TrainVariant:
    """Load the model fresh and set it up exactly like the hf backend: fake quant first, then LoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    from qatkit.models.assembly import attach_lora, prepare_for_qat
    from qatkit.quant.patches import cache_frozen_weight_fake_quant, fake_quantizers

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=train_dtype())
    recipe = bench_recipe(scheme or DEFAULT_SCHEMES[0], lora_mode or "unmerged", lora_r)
    if scheme is not None:
        prepare_for_qat(recipe, model)
    torch.manual_seed(seed)  # LoRA init draws from the global RNG: same adapters in every variant
    model = attach_lora(recipe, model)
    cached = cache_frozen_weight_fake_quant(model) if cache else 0
    model.to(device())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    info = {
        "fake_quantized_modules": len(fake_quantizers(model)),
        "lora_layers": sum(1 for n, _ in model.named_modules() if n.endswith("lora_A")),
        "cached_fake_quantizers": cached,
        "trainable_params": sum(p.numel() for p in params),
    }
    return TrainVariant(variant_name(scheme, lora_mode, cache), scheme, lora_mode, cache, model, optimizer, info)


def train_step(v: TrainVariant, ids) -> float:
    loss = v.model(input_ids=ids, labels=ids).loss
    loss.backward()
    v.optimizer.step()
    v.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def variant_specs(schemes: Sequence[str], lora_modes: Sequence[str], caches: Sequence[bool]) -> list[tuple]:
    return [(None, None, None)] + [(s, m, c) for s in schemes for m in lora_modes for c in caches]


def free_memory() -> None:
    """Release the memory of dropped models, back to the OS too (glibc keeps freed heap otherwise)."""
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_worker(kind: str, args: dict, timeout: float = 1800) -> dict:
    cmd = [sys.executable, "-m", "qatkit.bench", kind, json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"bench worker {kind} failed (exit {proc.returncode}): {' | '.join(tail)}")


def preimport(model_dir: str) -> None:
    """Import everything a variant will need before the baseline RSS, so every variant starts equal
    (transformers imports the architecture's modeling code lazily, on first use)."""
    import peft  # noqa: F401
    from torchao.quantization import quantize_  # noqa: F401
    from torchao.quantization.qat import QATConfig  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with contextlib.suppress(KeyError, AttributeError):
        AutoModelForCausalLM._model_mapping[type(config)]  # imports the modeling module
