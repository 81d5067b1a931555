"""Resolve and load models, tokenizers and data files: local dirs, hub ids, GGUF files, pkg: paths."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qatkit.core.cache import cache_key, cache_lock, cache_root, file_digest
from qatkit.core.env import package_versions
from qatkit.core.errors import EnvError, RecipeError
from qatkit.core.io import atomic_dir, is_done
from qatkit.core.paths import resolve_path

if TYPE_CHECKING:
    from qatkit.recipe import ModelSpec


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: an HF-format directory or hub id (`path`), optionally a GGUF file in it."""

    path: str
    gguf_file: str | None = None
    is_local: bool = True

    def describe(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def resolve_model(name_or_path: str) -> ModelSource:
    if name_or_path.startswith("pkg:") or name_or_path.endswith(".gguf") or Path(name_or_path).expanduser().exists():
        path = resolve_path(name_or_path)
        if not path.exists():
            raise RecipeError(f"model.name_or_path: {path} does not exist")
        if path.is_file():
            if path.suffix != ".gguf":
                raise RecipeError(f"model.name_or_path: {path} is a file but not a .gguf; give a model directory")
            _check_gguf(path)
            return ModelSource(str(path.parent), path.name)
        if not (path / "config.json").exists():
            raise RecipeError(f"model.name_or_path: {path} has no config.json (not a Hugging Face model directory)")
        return ModelSource(str(path))
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise RecipeError(f"model.name_or_path: {name_or_path} does not exist")
    return ModelSource(name_or_path, is_local=False)


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise RecipeError(f"model.name_or_path: {path} is not a GGUF file (bad magic bytes)")


def check_model_available(source: ModelSource) -> None:
    """Fail before any heavy work when a hub model is neither cached nor reachable."""
    if source.is_local:
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source.path, "config.json"), str):
        return
    reason = "HF_HUB_OFFLINE is set"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "", "false"):
        from huggingface_hub import HfApi

        try:
            HfApi().model_info(source.path, timeout=10)
            return
        except Exception as e:  # offline, DNS failure, gated or missing repo: all mean "not loadable now"
            reason = f"the hub is unreachable ({type(e).__name__})"
    raise EnvError(
        f"model {source.path} is not in the local Hugging Face cache and {reason}: it must be downloaded first "
        f"(huggingface-cli download {source.path}) or point model.name_or_path at a local copy"
    )


def materialize_gguf(source: ModelSource) -> ModelSource:
    """Dequantize a GGUF once into an HF directory under the qatkit cache (see `gguf_cache_key`).

    transformers re-dequantizes a GGUF on every load (slow); the cached copy loads like any HF model.
    """
    if source.gguf_file is None:
        return source
    gguf = Path(source.path) / source.gguf_file
    target = cache_root() / "gguf" / gguf_cache_key(gguf)
    if is_done(target):
        return ModelSource(str(target))
    with cache_lock(target):
        if not is_done(target):
            with atomic_dir(target) as tmp:
                _dequantize_gguf(source, gguf, tmp)
    return ModelSource(str(target))


def gguf_cache_key(gguf: Path) -> str:
    """The file's hash and the versions of what dequantizes it (gguf's reader, transformers' converters)."""
    parts = [file_digest(gguf), package_versions(("gguf", "transformers", "torch"))]
    return f"{gguf.stem}-{cache_key(parts, 16)}"


def _dequantize_gguf(source: ModelSource, gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once into the qatkit cache", gguf)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    # a GGUF-loaded model refuses to serialize because of its (already applied) gguf quantizer
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "SOURCE").write_text(f"{gguf}\nsha256={file_digest(gguf)}\n")


def model_fingerprint(name_or_path: str) -> dict:
    """What identifies the weights: hub revision, or sha256 of a GGUF, or config + weight file sizes of a dir."""
    source = resolve_model(name_or_path)
    if not source.is_local:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(source.path, "config.json")
        revision = Path(config).parent.name if isinstance(config, str) else None
        return {"source": source.path, "kind": "hub", "revision": revision}
    root = Path(source.path)
    if source.gguf_file:
        return {"source": str(root / source.gguf_file), "kind": "gguf", "sha256": file_digest(root / source.gguf_file)}
    h = hashlib.sha256((root / "config.json").read_bytes())
    for f in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return {"source": str(root), "kind": "local", "config_and_weights_sha256": h.hexdigest()[:16]}


def torch_dtype(name: str):

    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def load_model_and_tokenizer(spec: ModelSpec, path: str | None = None, **kwargs):
    """Load (model, tokenizer) from the recipe's model, or from `path` (e.g. a converted checkpoint)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if torch.cuda.is_available():
        kwargs.setdefault("device_map", "cuda")  # convert and eval run where the kernels are
    source = ModelSource(path) if path else resolve_model(spec.name_or_path)
    check_model_available(source)
    source = materialize_gguf(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=spec.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=torch_dtype(spec.dtype), trust_remote_code=spec.trust_remote_code, **kwargs
        )
    except OSError as e:
        raise EnvError(f"could not load model {source.describe()}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATES.get(spec.chat_template, spec.chat_template)
    return model, tokenizer


def require_chat_template(tokenizer, spec: ModelSpec) -> None:
    if not tokenizer.chat_template:
        raise RecipeError(
            f"the tokenizer of {spec.name_or_path} has no chat template: set model.chat_template to one of "
            f"{sorted(CHAT_TEMPLATES)} or a Jinja template string"
        )


CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\\n{{ message['content'] }}<|im_end|>\\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}"
    ),
    # Gemma-3 turns (as Unsloth's get_chat_template "gemma3"): the assistant speaks as "model"
    "gemma3": (
        "{{ bos_token }}{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "<start_of_turn>{{ role }}\\n{{ message['content'] | trim }}<end_of_turn>\\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\\n{% endif %}"
    ),
}
