"""Backend selection. Backends are imported lazily by name (only the chosen one is imported)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from qatkit.errors import EnvError, RecipeError

if TYPE_CHECKING:
    from qatkit.recipe import Recipe

log = logging.getLogger(__name__)

BACKENDS = {"hf": "qatkit.backends.hf:HFBackend", "unsloth": "qatkit.backends.unsloth:UnslothBackend"}


def trained_dir(recipe: Recipe, work: Path) -> Path:
    """Where a finetune writes what it trained: the LoRA adapter, or the full weights."""
    return work / ("model" if recipe.train.full_finetuning else "adapter")


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
        self,
        recipe: Recipe,
        examples: list[dict],
        work: Path,
        resume: bool,
        qat: bool = True,
        control: Path | None = None,
    ) -> TrainResult: ...


def unsloth_usable() -> tuple[bool, str]:
    if importlib.util.find_spec("unsloth") is None:
        return False, "unsloth is not installed (pip install 'qatkit[unsloth]')"
    import torch

    if not torch.cuda.is_available():
        return False, "unsloth needs a CUDA GPU (it silently drops qat_scheme on CPU)"
    return True, ""


def backend_name(recipe: Recipe) -> str:
    """hf, or unsloth when asked for (and usable), or with `auto` when usable and able to train the recipe."""
    if recipe.backend == "hf":
        return "hf"
    ok, why = unsloth_usable()
    if recipe.backend == "unsloth" and not ok:
        raise EnvError(f"backend: unsloth requested but {why}; use backend: hf or auto")
    if not ok:
        return "hf"
    from qatkit.backends.unsloth import check_recipe

    if recipe.backend == "unsloth":
        check_recipe(recipe)
        return "unsloth"
    try:
        check_recipe(recipe)
    except RecipeError as e:
        log.info("backend auto: using hf (%s)", e)
        return "hf"
    return "unsloth"


def select_backend(recipe: Recipe) -> Backend:
    module, _, cls = BACKENDS[backend_name(recipe)].partition(":")
    return getattr(importlib.import_module(module), cls)()
