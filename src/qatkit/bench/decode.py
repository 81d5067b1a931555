"""Decode latency and memory of converted checkpoints vs the original (one persistent worker per model)."""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from qatkit.bench.checkpoint import save_converted
from qatkit.bench.common import (
    RESULT_PREFIX,
    SCORE_BATCH,
    SEED,
    device,
    load_kwargs,
    median,
    preimport,
    quiet,
    random_ids,
    rss_mb,
    sync,
)
from qatkit.core.env import peak_rss_mb

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


def decode_worker(args: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    quiet()
    preimport(args["model_dir"])  # torchao too: a converted checkpoint needs it
    baseline = rss_mb()
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(args["model_dir"], **load_kwargs()).eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = random_ids(vocab, 1, args["prompt_len"], SEED + 2).to(device())
    batch = random_ids(vocab, SCORE_BATCH, args["prompt_len"], SEED + 3).to(device())
    n = args["new_tokens"]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)

    def generate():
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        sync()
        return time.perf_counter() - t0, out[0, ids.shape[1] :].tolist()

    def score() -> float:
        """One forward over a batch of prompts: what lm-eval's log-likelihood scoring does."""
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=batch)
        sync()
        return time.perf_counter() - t0

    generate()  # warm-up
    score()
    print(RESULT_PREFIX + json.dumps({"ready": True, "after_load_rss_mb": rss_mb()}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            seconds, tokens = generate()
            result = {"seconds": seconds, "tokens": tokens, "score_seconds": score()}
            print(RESULT_PREFIX + json.dumps(result), flush=True)

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
                # the cards' "Peak Memory (GB)": max_memory_reserved / 1e9
                "cuda_peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda else None,
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
    ready, runs, final = _decode_rounds(model_dir, schemes, prompt_len, new_tokens, repeats, converted_dirs, threads)

    def summary(i: int) -> dict:
        secs = [x["seconds"] for x in runs[i]]
        med = median(secs)
        return {"median_s": med, "tokens_per_s": new_tokens / med, "times_s": secs, **ready[i], **final[i]}

    orig = summary(0)
    mem_key = "cuda_peak_mb" if orig.get("cuda_peak_mb") is not None else "peak_above_baseline_mb"
    out = {}
    for i, sc in enumerate(schemes, start=1):
        conv = summary(i)
        out[sc] = {
            "scheme": sc,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "original": orig,
            "converted": conv,
            "torch_threads": threads or "default",
            "latency_ratio": median([c["seconds"] / o["seconds"] for o, c in zip(runs[0], runs[i], strict=True)]),
            "score_batch": SCORE_BATCH,
            "score_ratio": median(
                [c["score_seconds"] / o["score_seconds"] for o, c in zip(runs[0], runs[i], strict=True)]
            ),
            "tokens_per_s_ratio": conv["tokens_per_s"] / orig["tokens_per_s"],
            "memory_measure": mem_key,
            "memory_ratio": conv[mem_key] / orig[mem_key],
            "peak_rss_ratio": conv["peak_rss_mb"] / orig["peak_rss_mb"],
            "greedy_tokens_matching_original": sum(
                x == y for x, y in zip(runs[0][0]["tokens"], runs[i][0]["tokens"], strict=True)
            ),
        }
    return out


def _decode_rounds(
    model_dir: str | Path,
    schemes: Sequence[str],
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    converted_dirs: dict[str, str | Path] | None,
    threads: int | None,
) -> tuple[list[dict], list[list[dict]], list[dict]]:
    """One worker for the original model, then one per scheme (converting what `converted_dirs` lacks); `repeats`
    rounds, the order rotating. Returns, per worker (original first): its ready message, its runs, its last word."""
    tmp = Path(tempfile.mkdtemp(prefix="qatkit-bench-decode-"))
    workers: list[_DecodeWorker] = []
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
    return ready, runs, final
