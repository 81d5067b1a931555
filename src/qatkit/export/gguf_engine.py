"""The exported GGUF run in llama.cpp itself (llama-cpp-python, the `llamacpp` extra): its per-position logits
against the converted model's on the same tokens, top-1 agreement, and greedy decoding against transformers'.

llama.cpp quantizes activations to Q8_0 blocks inside its Q4_0 / Q8_0 matmuls, which the torch model does not, so the
logits agree to about 27-45 dB (Gemma 3 270M, SmolLM2-135M, tiny models) rather than bit for bit; the weights
themselves are checked exactly elsewhere (`gguf.read_back_exact`). Simulating that quantization in torch reproduces
llama.cpp's held-out NLL to 1e-4 but not its logits token by token: float32 differences flip roundings, which compound
(benchmarks/gguf-activations/). Flash attention stays off (it alone costs tens of
dB), one thread, fixed.
"""

from __future__ import annotations

from pathlib import Path

ENGINE_MISSING = "llama-cpp-python is not installed (pip install 'qatkit[llamacpp]'): the GGUF was not run in llama.cpp"


def engine_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return f"llama-cpp-python {llama_cpp.__version__}"


def open_llama(path: Path, n_ctx: int, threads: int = 1):
    from llama_cpp import Llama

    return Llama(
        model_path=str(path),
        logits_all=True,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=False,
        verbose=False,
    )


def llama_cpp_logits(llm, tokens: list[int]):
    import numpy as np

    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def text_nll(path: Path, sequences: list[list[int]], threads: int = 1) -> tuple[float, int]:
    """llama.cpp's mean negative log-likelihood per token of `sequences` (each token given the ones before it; the
    first has no context and is not scored), and the number of tokens scored."""
    import torch

    llm = open_llama(path, max(map(len, sequences)) + 8, threads)
    total, count = 0.0, 0
    try:
        for seq in sequences:
            logprobs = torch.from_numpy(llama_cpp_logits(llm, seq)[:-1]).log_softmax(-1)
            total -= logprobs.gather(1, torch.tensor(seq[1:])[:, None]).sum().item()
            count += len(seq) - 1
    finally:
        llm.close()
    return total / max(count, 1), count


def greedy(llm, prompt: list[int], steps: int) -> list[int]:
    out: list[int] = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        out.append(int(token))
        if len(out) == steps:
            break
    return out


def engine_parity(path: Path, model, sequences: list[list[int]], greedy_steps: int = 8) -> dict:
    """llama.cpp vs the converted `model` on `sequences` (token ids): logits SQNR and max abs diff over all
    positions, top-1 agreement, and the greedy continuation of the first sequence in both."""
    import torch

    from qatkit.core.metrics import compare

    n_ctx = max(len(s) for s in sequences) + greedy_steps + 8
    llm = open_llama(path, n_ctx)
    try:
        ours, theirs = [], []
        for seq in sequences:
            with torch.no_grad():
                ours.append(model(torch.tensor([seq], device=model.device)).logits[0].float().cpu())
            theirs.append(torch.from_numpy(llama_cpp_logits(llm, seq)))
        prompt = sequences[0]
        engine_tokens = greedy(llm, prompt, greedy_steps)
    finally:
        llm.close()
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt], device=model.device), max_new_tokens=greedy_steps, do_sample=False, min_new_tokens=0
        )
    hf_tokens = generated[0, len(prompt) :].tolist()
    agree = 0  # leading tokens both engines chose alike
    while agree < min(len(engine_tokens), len(hf_tokens)) and engine_tokens[agree] == hf_tokens[agree]:
        agree += 1
    a, b = torch.cat(ours), torch.cat(theirs)
    return {
        "engine": engine_version(),
        **compare(a, b),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "tokens": int(a.shape[0]),
        "greedy_tokens": engine_tokens,
        "greedy_same_as_transformers": agree,
    }
