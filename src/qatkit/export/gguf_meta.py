"""What a GGUF says besides its tensors: the architecture's hyperparameters and the tokenizer, as llama.cpp's
convert_hf_to_gguf.py writes them for Llama, Qwen3 and Gemma 3, or copied from the GGUF the model came from.

From an HF directory: `config.json` gives the `<arch>.*` keys; a byte-level BPE `tokenizer.json` gives
`tokenizer.ggml.model = gpt2` with its tokens, token types, merges and llama.cpp's name for its pre-tokenizer.
From a GGUF source: its `<arch>.*`, `tokenizer.*` and descriptive `general.*` keys are copied as they are, which is
exact by construction (the fine-tune changes no hyperparameter and no token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qatkit.core.errors import RecipeError

ARCHS = {"llama": "llama", "qwen3": "qwen3", "gemma3_text": "gemma3", "gemma3": "gemma3"}  # HF model_type -> GGUF
COPIED_GENERAL = ("general.name", "general.organization", "general.basename", "general.finetune", "general.license")
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


def gguf_arch(model_type: str) -> str:
    if model_type not in ARCHS:
        raise RecipeError(
            f"GGUF export knows the architectures {', '.join(sorted(set(ARCHS) - {'gemma3'}))}, not {model_type!r}"
        )
    return ARCHS[model_type]


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: object
    vtype: object  # gguf.GGUFValueType
    sub_type: object | None = None


def _rope_theta(config, layer_type: str = "full_attention") -> float:
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get(layer_type, params)
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _check_rope(config) -> None:
    params = getattr(config, "rope_parameters", None) or {}
    for p in params.values() if "full_attention" in params else [params]:
        kind = p.get("rope_type", "default")
        if kind not in ("default", "linear"):
            raise RecipeError(f"GGUF export: rope scaling {kind!r} is not supported (default and linear are)")


def arch_key_values(config) -> list[KeyValue]:
    """`<arch>.*` from an HF config, as convert_hf_to_gguf.py sets them for llama / qwen3 / gemma3."""
    from gguf import GGUFValueType as T

    arch = gguf_arch(config.model_type)
    _check_rope(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    u32 = {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
    }
    if arch == "llama":
        u32["rope.dimension_count"] = head_dim
    if arch == "gemma3":
        u32["attention.sliding_window"] = config.sliding_window
    f32 = {"attention.layer_norm_rms_epsilon": config.rms_norm_eps, "rope.freq_base": _rope_theta(config)}
    kvs = [KeyValue(f"{arch}.{k}", int(v), T.UINT32) for k, v in u32.items()]
    kvs += [KeyValue(f"{arch}.{k}", float(v), T.FLOAT32) for k, v in f32.items()]
    full = (getattr(config, "rope_parameters", None) or {}).get("full_attention", {})
    if arch == "gemma3" and full.get("rope_type") == "linear":  # applied to the global layers only, as llama.cpp does
        kvs += [
            KeyValue(f"{arch}.rope.scaling.type", "linear", T.STRING),
            KeyValue(f"{arch}.rope.scaling.factor", float(full["factor"]), T.FLOAT32),
        ]
    return kvs


# llama.cpp's names (tokenizer.ggml.pre) of the byte-level pre-tokenizers a tokenizer.json can hold
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer_name(pre: dict | None) -> str:
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT:
        return "qwen2"
    raise RecipeError(
        f"GGUF export: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one qatkit "
        "knows llama.cpp's name for (gpt-2, smollm, qwen2); start the recipe from the model's GGUF to copy its tokenizer"
    )


def hf_tokenizer_key_values(model_dir: Path) -> tuple[list[KeyValue], object]:
    """A byte-level BPE tokenizer.json as llama.cpp's gpt2 tokenizer, plus gguf-py's SpecialVocab (merges, special
    token ids, add_bos, chat template) to add to the writer."""
    from gguf import GGUFValueType as T
    from gguf import SpecialVocab

    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise RecipeError(f"GGUF export needs {path} (a byte-level BPE tokenizer) or a GGUF source model")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise RecipeError(
            "GGUF export from an HF directory supports byte-level BPE tokenizers (Llama 3, SmolLM2, Qwen); for a "
            "SentencePiece one (Gemma) start the recipe from the model's GGUF, whose tokenizer is copied"
        )
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    vocab = {i: tok for tok, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    if sorted(vocab) != list(range(len(vocab))):
        raise RecipeError(f"GGUF export: {path} has gaps in its token ids")
    tokens = [vocab[i] for i in range(len(vocab))]
    types = [
        (TOKEN_CONTROL if added[i]["special"] else TOKEN_USER_DEFINED) if i in added else TOKEN_NORMAL
        for i in range(len(tokens))
    ]
    kvs = [
        KeyValue("tokenizer.ggml.model", "gpt2", T.STRING),
        KeyValue("tokenizer.ggml.pre", _pre_tokenizer_name(data.get("pre_tokenizer")), T.STRING),
        KeyValue("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
        KeyValue("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
    ]
    return kvs, SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))


def gguf_source_key_values(source: Path) -> tuple[str, list[KeyValue]]:
    """(architecture, the `<arch>.*`, `tokenizer.*` and descriptive `general.*` pairs) of a GGUF file, as stored."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    kvs = []
    for key, field in reader.fields.items():
        if key.startswith((f"{arch}.", "tokenizer.")) or key in COPIED_GENERAL:
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            kvs.append(KeyValue(key, field.contents(), field.types[0], sub))
    return arch, kvs
