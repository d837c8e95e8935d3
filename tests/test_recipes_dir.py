from pathlib import Path

import pytest

from conftest import ROOT
from gpt2tune.recipe import load_recipe

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    assert r.output.dir.startswith("runs/")


def test_quickstart_is_offline_scratch():
    r = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert r.model.init == "scratch" and r.model.tokenizer == "from-data"
    assert r.data.source == "builtin:tang-lvshi"
