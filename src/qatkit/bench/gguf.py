"""`gguf` section of `qatkit bench perf`: decode speed and file size of the model in llama.cpp, Q4_0 (the q4_0
scheme's integers packed as `qatkit export` packs them) vs F16 of the same weights, and vs transformers fp32.

Speed and size do not depend on the weights' values, so the Q4_0 file is the model PTQ'd on the q4_0 grid: a QAT
run's export has the same layout. Greedy decode of `new_tokens` after a `prompt_len`-token prompt, best of
`repeats`, every engine on `threads` threads, interleaved in one run.
"""

import tempfile
import time
from pathlib import Path

from qatkit.bench.common import load_kwargs, quiet


def _llama_cpp_tok_s(path: Path, prompt: list[int], new_tokens: int, threads: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads, verbose=False)
    try:
        llm.eval(prompt)  # the prompt is not timed: decode only
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = llm.sample(top_k=1, temp=0.0)
            llm.eval([token])
        return new_tokens / (time.perf_counter() - start)
    finally:
        llm.close()


def _transformers_tok_s(model, prompt: list[int], new_tokens: int) -> float:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        token = ids[:, -1:]
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return new_tokens / (time.perf_counter() - start)


def gguf_decode(model_dir: str, prompt_len: int, new_tokens: int, repeats: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from qatkit.export.gguf import export_gguf
    from qatkit.quant.apply import quantize_ptq
    from qatkit.quant.spec import QuantSpec

    quiet()
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **load_kwargs()).eval()
    prompt = torch.randint(3, model.config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()
    with tempfile.TemporaryDirectory(prefix="qatkit-bench-gguf-") as tmp:
        files = {"F16": Path(tmp) / "f16.gguf", "Q4_0": Path(tmp) / "q4_0.gguf"}
        export_gguf(model, model_dir, files["F16"], "F16", "f16")
        fp32 = max(_transformers_tok_s(model, prompt, new_tokens) for _ in range(repeats))
        quantize_ptq(model, QuantSpec.named("q4_0"))
        export_gguf(model, model_dir, files["Q4_0"], "Q4_0", "f16")
        speed = {k: 0.0 for k in files}
        for _ in range(repeats):  # interleaved, best of `repeats`
            for kind, path in files.items():
                speed[kind] = max(speed[kind], _llama_cpp_tok_s(path, prompt, new_tokens, threads))
        sizes = {kind: path.stat().st_size for kind, path in files.items()}
    return {
        "threads": threads,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "transformers_fp32_tok_s": round(fp32, 2),
        "llamacpp_tok_s": {k: round(v, 2) for k, v in speed.items()},
        "file_bytes": sizes,
        "q4_0_vs_fp32_speed": round(speed["Q4_0"] / fp32, 2),
        "q4_0_vs_f16_speed": round(speed["Q4_0"] / speed["F16"], 2),
        "q4_0_vs_f16_size": round(sizes["Q4_0"] / sizes["F16"], 3),
    }
