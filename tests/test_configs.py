"""Every shipped recipe under configs/ validates and begins with the exact command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fuselab.merge import MergeRecipe, get_merge_method
from fuselab.merge.engine import validate_parameters

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.rglob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES, "configs/ holds no recipes"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_recipe_is_valid_and_documents_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# fuselab ") or first.startswith("# make "), (
        f"{path} must begin with its command"
    )
    assert str(path.relative_to(CONFIGS.parent)) in first, (
        f"{path}: the command on line 1 must name this file"
    )
    data = yaml.safe_load(path.read_text())
    if path.parent.name == "merge":
        recipe = MergeRecipe.model_validate(data)
        method = get_merge_method(recipe.merge_method)
        validate_parameters(method, recipe, list(range(len(recipe.models))))
    else:
        pytest.fail(f"no validator for recipes in {path.parent}")
