"""`.pte` size and decode latency in the ExecuTorch runtime vs transformers fp32 and vs the converted torchao
checkpoint, in one run (one persistent worker per model, interleaved rounds, medians)."""

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from qatkit.bench.checkpoint import save_converted
from qatkit.bench.common import RESULT_PREFIX, SEED, median, quiet, random_ids
from qatkit.bench.decode import _DecodeWorker

SCHEME = "int8-int4"


def pte_decode_worker(args: dict) -> None:
    """The decode worker's protocol (ready, then `run` -> seconds and tokens, `quit`) for a .pte: the prompt in one
    call, then exactly `new_tokens - 1` greedy KV-cache steps."""
    from qatkit.export.executorch import PteModel

    if args.get("threads"):  # ExecuTorch's own threadpool (XNNPACK), like torch's in the other workers; before
        # the program loads (resetting it under a loaded XNNPACK delegate crashes)
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(args["threads"])
    pte = PteModel(Path(args["model_dir"]))
    ids = random_ids(pte.vocab_size, 1, args["prompt_len"], SEED + 2)[0].tolist()

    def generate() -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        tokens = [int(pte.logits(ids, 0)[-1].argmax())]
        while len(tokens) < args["new_tokens"]:
            tokens.append(int(pte.logits(tokens[-1:], len(ids) + len(tokens) - 1)[-1].argmax()))
        return time.perf_counter() - t0, tokens

    generate()  # warm-up
    print(RESULT_PREFIX + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            seconds, tokens = generate()
            print(RESULT_PREFIX + json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)
        elif line.strip() == "quit":
            break
    print(RESULT_PREFIX + json.dumps({}), flush=True)


def executorch_decode(
    model_dir: str | Path,
    prompt_len: int,
    new_tokens: int,
    *,
    repeats: int,
    max_seq_len: int = 256,
    threads: int | None = None,
) -> dict:
    """int8-int4 PTQ of `model_dir` exported to a .pte: its size vs the scheme's floor, and greedy decode (batch 1,
    `new_tokens` tokens after a `prompt_len` prompt) vs the original fp32 model and the converted checkpoint."""
    try:
        from qatkit.export.executorch import load_converted, lower, size_floor
    except ImportError:
        return {"skipped": "executorch is not installed: pip install 'qatkit[executorch]'"}
    quiet()
    tmp = Path(tempfile.mkdtemp(prefix="qatkit-bench-executorch-"))
    workers: list[_DecodeWorker] = []
    try:
        save_converted(model_dir, SCHEME, tmp / "converted")
        model, _ = load_converted(tmp / "converted")
        t0 = time.perf_counter()
        (tmp / "model.pte").write_bytes(lower(model, max_seq_len, []))
        lower_s = time.perf_counter() - t0
        floor = size_floor(model)
        del model
        paths = {"original": model_dir, "converted": tmp / "converted", "pte": tmp / "model.pte"}
        workers = [_DecodeWorker(k, str(p), prompt_len, new_tokens, threads or 0, tmp) for k, p in paths.items()]
        for w in workers:
            w.read()
        runs: list[list[float]] = [[] for _ in workers]
        tokens = [[] for _ in workers]
        for r in range(repeats):
            for i in range(len(workers)):
                j = (i + r) % len(workers)
                out = workers[j].ask("run")
                runs[j].append(out["seconds"])
                tokens[j] = out["tokens"]
        for w in workers:
            w.ask("quit")
        pte_bytes = (tmp / "model.pte").stat().st_size
    finally:
        for w in workers:
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)
    ms = {k: 1000 * median(runs[i]) / new_tokens for i, k in enumerate(paths)}
    ratio = {k: median([p / o for p, o in zip(runs[2], runs[i], strict=True)]) for i, k in enumerate(paths) if i < 2}
    return {
        "scheme": SCHEME,
        "max_seq_len": max_seq_len,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "pte_bytes": pte_bytes,
        "floor_bytes": floor["bytes"],
        "ratio_vs_floor": pte_bytes / floor["bytes"],
        "lower_seconds": round(lower_s, 1),
        "ms_per_token": ms,
        "pte_time_ratio_vs_original": ratio["original"],
        "pte_time_ratio_vs_converted": ratio["converted"],
        "greedy_tokens_matching_converted": sum(a == b for a, b in zip(tokens[1], tokens[2], strict=True)),
        "times_s": dict(zip(paths, runs, strict=True)),
    }
