"""Reading a recipe: YAML, `--set key.path=value` overrides applied before validation, paths relative to the recipe
file, and validation errors as one message per problem with a did-you-mean for unknown keys."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from qatkit.core.errors import RecipeError
from qatkit.recipe.schema import Recipe

# names other tools (Unsloth, TRL, Axolotl, torchtune) use for the same settings
FOREIGN_NAMES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "lr_scheduler",
    "optimizer": "optim",
    "model_name": "name_or_path",
    "base_model": "name_or_path",
    "qat_scheme": "scheme",
    "torch_dtype": "dtype",
    "num_steps": "max_steps",
    "steps": "max_steps",
    "warmup": "warmup_steps",
}


def did_you_mean(word: str, choices: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `choices` (or the name qatkit uses for another tool's), else ''."""
    if FOREIGN_NAMES.get(word) in choices:
        return f" (did you mean '{FOREIGN_NAMES[word]}'?)"
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _section(field) -> type[BaseModel] | None:
    """The pydantic model a field holds (`qat: QatSpec`, `distill: DistillSpec | None`), or None for a value."""
    ann = field.annotation
    return next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _model_for(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the field at `loc` (for did-you-mean on unknown keys)."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        model = _section(field) if field is not None else None
        if model is None:
            return None
    return model


def _in_other_sections(word: str, here: type[BaseModel] | None) -> str:
    """' (did you mean 'qat.learn_scales'?)' for a key that is a setting of another recipe section."""
    name = FOREIGN_NAMES.get(word, word)
    found = [
        f"'{section}.{name}'"
        for section, field in Recipe.model_fields.items()
        if (model := _section(field)) not in (None, here) and name in model.model_fields
    ]
    return f" (did you mean {' or '.join(found)}?)" if found else ""


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not isinstance(p, int) or e["type"] != "extra_forbidden")
        key = ".".join(str(p) for p in loc) or "recipe"
        if e["type"] == "extra_forbidden":
            parent = _model_for(loc)
            hint = did_you_mean(str(loc[-1]), list(parent.model_fields)) if parent else ""
            hint = hint or _in_other_sections(str(loc[-1]), parent)
            problems.append(f"{key}: unknown key{hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {msg}")
    return problems


def _parse_value(raw: str) -> Any:
    return yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` overrides (YAML-typed values) to the raw recipe dict."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key.path=value")
        path, raw = item.split("=", 1)
        node = data
        keys = path.strip().split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: {k} is not a section")
        node[keys[-1]] = _parse_value(raw)
    return data


def _resolve_relative(data: dict, base: Path) -> None:
    """Local paths in a recipe are relative to the recipe file; hub ids and pkg: paths stay as given."""
    for section, key in (
        ("model", "name_or_path"),
        ("data", "path"),
        ("data", "eval_path"),
        ("eval", "include_path"),
        ("eval", "text_path"),
    ):
        node = data.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, str) or value.startswith("pkg:") or Path(value).is_absolute():
            continue
        candidate = base / Path(value).expanduser()
        if value.startswith((".", "~")) or candidate.exists():
            node[key] = str(candidate.resolve())


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of sections (name, model, qat, ...)")
    apply_overrides(data, overrides or [])
    _resolve_relative(data, path.parent.resolve())
    return validate_recipe(data, source=str(path))


def validate_recipe(data: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError([f"{source}: {p}" for p in _format_errors(e)]) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(), sort_keys=False)
