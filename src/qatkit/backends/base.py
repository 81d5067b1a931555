"""Backend selection. Backends are imported lazily by name (only the chosen one is imported)."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from qatkit.errors import EnvError

if TYPE_CHECKING:
    from qatkit.recipe import Recipe

BACKENDS = {"hf": "qatkit.backends.hf:HFBackend", "unsloth": "qatkit.backends.unsloth:UnslothBackend"}


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    first_loss: float | None
    seconds: float
    loss_history: list[dict] = field(default_factory=list)
    fake_quantized_modules: int = 0
    lora_layers: int = 0
    resumed_from_step: int | None = None

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "loss_history"}


class Backend(Protocol):
    name: str

    def finetune(
        self, recipe: Recipe, examples: list[dict], work: Path, resume: bool, qat: bool = True
    ) -> TrainResult: ...


def unsloth_usable() -> tuple[bool, str]:
    if importlib.util.find_spec("unsloth") is None:
        return False, "unsloth is not installed (pip install 'qatkit[unsloth]')"
    import torch

    if not torch.cuda.is_available():
        return False, "unsloth needs a CUDA GPU (it silently drops qat_scheme on CPU)"
    return True, ""


def backend_name(recipe: Recipe) -> str:
    if recipe.backend == "hf":
        return "hf"
    ok, why = unsloth_usable()
    if recipe.backend == "unsloth" and not ok:
        raise EnvError(f"backend: unsloth requested but {why}; use backend: hf or auto")
    return "unsloth" if ok else "hf"


def select_backend(recipe: Recipe) -> Backend:
    module, _, cls = BACKENDS[backend_name(recipe)].partition(":")
    return getattr(importlib.import_module(module), cls)()
