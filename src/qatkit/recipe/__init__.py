"""Recipes: the schema (`recipe.schema`) and reading a recipe file with overrides (`recipe.loading`)."""

from qatkit.recipe.loading import apply_overrides, did_you_mean, dump_recipe, load_recipe, validate_recipe
from qatkit.recipe.schema import (
    STAGES,
    DataSource,
    DataSpec,
    DistillSpec,
    EvalSpec,
    ModelSpec,
    QatSpec,
    Recipe,
    TrainSpec,
)

__all__ = [
    "STAGES",
    "DataSource",
    "DataSpec",
    "DistillSpec",
    "EvalSpec",
    "ModelSpec",
    "QatSpec",
    "Recipe",
    "TrainSpec",
    "apply_overrides",
    "did_you_mean",
    "dump_recipe",
    "load_recipe",
    "validate_recipe",
]
