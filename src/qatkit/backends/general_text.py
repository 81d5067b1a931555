"""General text for distillation beside the task (`distill.general`): running text from a file, or sequences the
teacher samples itself (LLM-QAT, Liu et al. 2023: data-free), served as a cycling stream of padded batches, or
packed into full-length sequences."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING

from qatkit.core import interrupts
from qatkit.core.cache import cache_key, cache_lock, cache_root
from qatkit.core.errors import RecipeError
from qatkit.core.io import read_json, read_jsonl, write_json_atomic
from qatkit.core.paths import resolve_path
from qatkit.data import texts

if TYPE_CHECKING:
    from qatkit.recipe.schema import GeneralTextSpec

log = logging.getLogger(__name__)

TEACHER = "teacher"  # distill.general.path that asks for the teacher's own samples
GREEDY_PREFIX = 3  # LLM-QAT's hybrid sampling: the first tokens greedy, the rest sampled


class GeneralBatches:
    """Token sequences cut into right-padded batches of `batch_size`, reshuffled (seeded) on every pass."""

    def __init__(self, sequences: list[list[int]], batch_size: int, pad_id: int, seed: int):
        if not sequences:
            raise RecipeError("distill.general: no general-text sequences")
        self.sequences, self.batch_size, self.pad_id = sequences, batch_size, pad_id
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next(self, device=None) -> dict:
        while len(self.order) < self.batch_size:
            self.order += self.rng.sample(range(len(self.sequences)), len(self.sequences))
        picked = [self.sequences[i] for i in self.order[: self.batch_size]]
        del self.order[: self.batch_size]
        return right_padded(picked, self.pad_id, device)


def pad_id(tokenizer) -> int:
    """The id right padding fills with: the tokenizer's pad token, else 0 (masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def right_padded(sequences: list[list[int]], pad_id: int, device=None) -> dict:
    """Token sequences as one right-padded batch: input_ids and attention_mask."""
    import torch

    width = max(map(len, sequences))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device)
    return {"input_ids": ids, "attention_mask": mask}


def general_batches(
    spec: GeneralTextSpec,
    teacher,
    tokenizer,
    task_batch_size: int,
    seed: int,
    model_identity: dict,
    kept: Path | None = None,
) -> GeneralBatches:
    """The stream `distill.general` asks for: `share` general sequences per task example, at least one a batch."""
    sequences = general_sequences(spec, teacher, tokenizer, seed, model_identity, kept)
    return GeneralBatches(sequences, max(1, round(task_batch_size * spec.share)), pad_id(tokenizer), seed)


def general_sequences(
    spec: GeneralTextSpec, teacher, tokenizer, seed: int, model_identity: dict, kept: Path | None = None
) -> list[list[int]]:
    """distill.general's token sequences, packed or cut to max_tokens (no teacher needed for a text file)."""
    if spec.path == TEACHER:
        sequences = teacher_samples(spec, teacher, tokenizer, seed, model_identity, kept)
    else:
        sequences = [tokenizer(t, add_special_tokens=True).input_ids for t in corpus(spec)]
    if spec.packing:
        sequences = packed(sequences, spec.max_tokens, tokenizer.eos_token_id, seed, leading_bos(tokenizer))
    else:
        sequences = [s[: spec.max_tokens] for s in sequences]
    return [s for s in sequences if len(s) > 1]  # a single token has nothing to predict


def leading_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer starts every text with it (Gemma, whose predictions collapse without it)."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a").input_ids[:1] == [bos] else None


def packed(
    documents: list[list[int]], length: int, eos_id: int, seed: int, bos_id: int | None = None
) -> list[list[int]]:
    """The documents in a seeded random order, each ended by EOS (unless it already is: a teacher sample that
    stopped), joined and cut into sequences of `length` tokens; the last one holds the remainder. With `bos_id`,
    every sequence starts with BOS, as every text the model saw did, and the documents lose their own."""
    prefix = [] if bos_id is None else [bos_id]
    order = random.Random(seed).sample(documents, len(documents))
    if prefix:
        order = [doc[1:] if doc[:1] == prefix else doc for doc in order]
    stream = [token for doc in order for token in (doc if doc[-1:] == [eos_id] else [*doc, eos_id])]
    step = length - len(prefix)
    return [prefix + stream[i : i + step] for i in range(0, len(stream), step)]


def corpus(spec: GeneralTextSpec) -> list[str]:
    """The documents of `path`, then of each `mix` source: the head of each file (a held-out text NLL on the same
    file would take the tail)."""
    documents = []
    for path, field, docs in [(spec.path, spec.field, spec.docs), *((m.path, m.field, m.docs) for m in spec.mix)]:
        found = texts(read_jsonl(resolve_path(path)), field)
        if not found:
            raise RecipeError(f"distill.general: {path} has no rows with a text field {field!r}")
        documents += found[:docs]
    return documents


def teacher_samples(
    spec: GeneralTextSpec,
    teacher,
    tokenizer,
    seed: int,
    model_identity: dict,
    kept: Path | None = None,
    batch_size: int = 64,
) -> list[list[int]]:
    """`docs` sequences of up to `max_tokens` the teacher samples from its own distribution, each started from a
    random vocabulary token (after BOS, for a tokenizer that starts every text with it), the next GREEDY_PREFIX
    tokens greedy and the rest sampled at temperature 1 (LLM-QAT's hybrid), cached under the model, settings and
    seed, `batch_size` at a time (64: twice 16's throughput on a 2-core CPU for SmolLM2-135M, 1.1 s a 256-token
    sequence). With `kept` (a run's folder) a copy is kept there too, and read from there when the cache lacks it: a
    resumed run on a fresh machine trains on the samples it started with, not new ones.

    Each batch is seeded by the seed and its place, and saved as it is drawn (`<key>.partial.json`, in the cache and
    in `kept`): an interrupted draw goes on from its last batch, here or on a fresh machine from the run's copy
    (`qatkit pack` carries it), and ends with the samples an uninterrupted one draws."""
    # the batch is in the key: it decides which random draws each sequence gets
    settings = {"docs": spec.docs, "max_tokens": spec.max_tokens, "seed": seed, "batch": batch_size}
    key = cache_key({"model": model_identity, **settings, "v": 3})
    entry = cache_root() / "general-text" / f"{key}.json"
    copy = kept / entry.name if kept else None
    with cache_lock(entry):
        found = read_json(entry) or (copy and read_json(copy))
        if not found:
            progress = [p.with_suffix(".partial.json") for p in (entry, copy) if p]
            found = _draw(spec, teacher, tokenizer, seed, batch_size, model_identity, progress)
        if not entry.exists():
            write_json_atomic(entry, found, indent=None)
        entry.with_suffix(".partial.json").unlink(missing_ok=True)
    if copy:
        if not copy.exists():
            copy.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(copy, found, indent=None)
        copy.with_suffix(".partial.json").unlink(missing_ok=True)
    return found["sequences"]


def _draw(
    spec: GeneralTextSpec, teacher, tokenizer, seed: int, batch_size: int, model_identity: dict, progress: list[Path]
) -> dict:
    """The samples, from where the furthest of the `progress` files ends, each batch saved to all of them."""
    saved = [found for found in map(read_json, progress) if found]
    found = max(saved, key=lambda f: len(f["sequences"]), default={"model": model_identity, "seed": seed})
    sequences = found.setdefault("sequences", [])
    log.info("sampling %d general-text sequences from the teacher, from %d on", spec.docs, len(sequences))
    bos = leading_bos(tokenizer)
    for start in range(len(sequences), spec.docs, batch_size):
        batch_seed = random.Random(f"{seed}/{start}").getrandbits(63)
        count = min(batch_size, spec.docs - start)
        sequences += _sample(teacher, tokenizer, count, spec.max_tokens, batch_seed, bos)
        for path in progress:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, found, indent=None)
        log.info("%d of %d general-text sequences sampled", len(sequences), spec.docs)
        interrupts.stop_if_requested(f"while sampling general text ({len(sequences)} of {spec.docs} sequences kept)")
    return found


def _sample(teacher, tokenizer, count: int, max_tokens: int, seed: int, bos: int | None) -> list[list[int]]:
    """One batch of `count` samples, drawn from `seed` alone."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    prompt = [] if bos is None else [bos]  # then the random first token

    class GreedyPrefix(LogitsProcessor):
        """Leaves only the most likely token while fewer than GREEDY_PREFIX tokens follow the random first one."""

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - len(prompt) > GREEDY_PREFIX:
                return scores
            top = scores.argmax(dim=-1, keepdim=True)
            return torch.full_like(scores, -float("inf")).scatter(1, top, scores.gather(1, top))

    special = set(tokenizer.all_special_ids)
    candidates = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(seed)
    stop = tokenizer.eos_token_id
    teacher.eval()
    # seeded on a fork: drawing the samples (or finding them cached) leaves the caller's RNG, e.g. LoRA's init, as is
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        first = torch.tensor([[*prompt, rng.choice(candidates)] for _ in range(count)])
        rows = teacher.generate(
            first.to(teacher.device),
            attention_mask=torch.ones_like(first).to(teacher.device),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_tokens - first.shape[1],
            logits_processor=LogitsProcessorList([GreedyPrefix()]),
            pad_token_id=stop,
        ).tolist()
    # a row that ended early is padded with eos after its own eos: keep it up to and including that one
    return [row[: row.index(stop, first.shape[1]) + 1] if stop in row[first.shape[1] :] else row for row in rows]
