"""The documentation stays true to the code: docs/recipe-keys.md is what scripts/gen_recipe_docs.py generates from
the recipe models, and the relative links of the Markdown pages point at files that exist."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_recipe_docs", ROOT / "scripts" / "gen_recipe_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_keys_doc_is_current():
    committed = (ROOT / "docs" / "recipe-keys.md").read_text()
    assert committed == _generator().render(), (
        "docs/recipe-keys.md is stale: run `python scripts/gen_recipe_docs.py` and commit the result"
    )


def test_every_recipe_key_has_a_description():
    gen = _generator()
    missing = [
        f"{key}.{name}"
        for model, key in {gen.Recipe: "recipe", **gen._sections()}.items()
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert not missing, f"add a Field(description=...) in src/qatkit/recipe/schema.py for: {missing}"


def test_relative_links_point_at_files():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if not path or re.match(r"[a-z]+:", path):  # an anchor on the page, or a URL
                continue
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to missing files: {broken}"
