"""Tiny real models for tests and CI smoke runs: built from a config, with a locally trained tokenizer.

Nothing is downloaded. The architecture code is the real transformers one; only the size is tiny.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE trained on `texts` in well under a second, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHATML
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 512, tie: bool = True):
    from transformers import AutoConfig

    common = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=None,
    )
    if arch == "qwen3":
        return AutoConfig.for_model("qwen3", head_dim=32, **common)
    if arch == "gemma3_text":
        return AutoConfig.for_model("gemma3_text", head_dim=16, sliding_window=64, query_pre_attn_scalar=32, **common)
    return AutoConfig.for_model(arch, **common)


def build_tiny_model(out: Path, texts: list[str], arch: str = "llama", seed: int = 0, tie: bool = True) -> Path:
    """Save a tiny `arch` causal LM (fp32, seeded) and its tokenizer to `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer(texts)
    config = tiny_config(arch, vocab_size=len(tokenizer), tie=tie)
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
