"""Negative log-likelihoods: of the gold answers given their prompts, and of held-out running text. Finer-grained
than accuracy (every item contributes, not just the argmax)."""

from __future__ import annotations

from qatkit.core.errors import RecipeError
from qatkit.core.io import read_jsonl
from qatkit.core.paths import resolve_path
from qatkit.data import texts
from qatkit.recipe import EvalSpec


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


def heldout_gold_nll(model, tokenizer, docs: list[dict], batch_size: int = 8) -> float:
    """gold_nll of held-out task rows as qatkit writes them for lm-eval (context, choices, index of the gold one)."""
    golds = [d["choices"][d["gold"]] for d in docs]
    return gold_nll(model, tokenizer, [d["context"] for d in docs], golds, batch_size)


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
    found = texts(read_jsonl(resolve_path(spec.text_path)), spec.text_field)
    if not found:
        raise RecipeError(f"eval.text_path {spec.text_path}: no rows with a text field {spec.text_field!r}")
    return found[-spec.text_docs :]  # the tail: training data (if any) is taken from elsewhere
