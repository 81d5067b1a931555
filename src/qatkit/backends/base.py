"""Backend selection: which backend trains a recipe, from `backends.support` alone; only the chosen backend's module
is imported, by name."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from qatkit.backends.support import check_unsloth_recipe, unsloth_usable
from qatkit.core.errors import EnvError, RecipeError

if TYPE_CHECKING:
    from qatkit.recipe import Recipe
    from qatkit.run.records import TrainResult

log = logging.getLogger(__name__)

BACKENDS = {"hf": "qatkit.backends.hf:HFBackend", "unsloth": "qatkit.backends.unsloth:UnslothBackend"}


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


def backend_name(recipe: Recipe) -> str:
    """hf, or unsloth when asked for (and usable), or with `auto` when usable and able to train the recipe."""
    if recipe.backend == "hf":
        return "hf"
    ok, why = unsloth_usable()
    if recipe.backend == "unsloth" and not ok:
        raise EnvError(f"backend: unsloth requested but {why}; use backend: hf or auto")
    if not ok:
        return "hf"
    if recipe.backend == "unsloth":
        check_unsloth_recipe(recipe)
        return "unsloth"
    try:
        check_unsloth_recipe(recipe)
    except RecipeError as e:
        log.info("backend auto: using hf (%s)", e)
        return "hf"
    return "unsloth"


def select_backend(recipe: Recipe) -> Backend:
    module, _, cls = BACKENDS[backend_name(recipe)].partition(":")
    return getattr(importlib.import_module(module), cls)()
