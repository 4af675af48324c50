"""Every shipped recipe under configs/ validates and begins with the exact command that runs it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from fuselab.merge import MergeRecipe, get_merge_method
from fuselab.merge.engine import validate_parameters

# configs/<folder>/ -> the module whose validate_recipe_file(path) checks recipes in it.
STAGE_VALIDATORS = {
    "fusion": "fuselab.fusion.config",
    "wrpo": "fuselab.wrpo.config",
    "prune": "fuselab.prune.config",
    "": "fuselab.pipelines.config",
}

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
    folder = path.relative_to(CONFIGS).parts[0] if len(path.relative_to(CONFIGS).parts) > 1 else ""
    if folder == "merge":
        data = yaml.safe_load(path.read_text())
        recipe = MergeRecipe.model_validate(data)
        method = get_merge_method(recipe.merge_method)
        validate_parameters(method, recipe, list(range(len(recipe.models))))
    elif folder in STAGE_VALIDATORS:
        # Each stage's config module exposes validate_recipe_file(path): it parses the YAML with the same
        # strict config model the command uses, so a shipped recipe with a typo fails here.
        importlib.import_module(STAGE_VALIDATORS[folder]).validate_recipe_file(path)
    else:
        pytest.fail(f"no validator for recipes in {path.parent}")
