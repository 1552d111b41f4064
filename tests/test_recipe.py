"""Recipes: every built-in loads, dumps and reloads identically; bad recipes fail with the key and the source."""

from __future__ import annotations

import pytest
import yaml

from attnkit.recipe import Recipe, RecipeError, builtin_recipes
from attnkit.registry import UnknownMethodError, get_method, list_methods


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_builtin_recipes_round_trip(name, tmp_path):
    recipe = Recipe.load(name)
    assert recipe.name == name
    again = Recipe.load(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.load(path) == recipe


@pytest.mark.parametrize("name", sorted(list_methods()))
def test_every_registered_method_round_trips_its_defaults(name):
    method = get_method(name)()
    recipe = Recipe.load({"attnkit": 1, "name": "x", "steps": [method.to_step()]})
    assert recipe.steps[0] == method


@pytest.mark.parametrize(
    "steps, match",
    [
        ([{"method": "streaming_llm", "windw": 3}], r"steps\[0\] \(streaming_llm\): windw: unknown key"),
        ([{"method": "nope"}], r"steps\[0\].method: unknown method 'nope'; registered methods: .*streaming_llm"),
        ([{"method": "streaming_llm", "window": 0}], r"window: Input should be greater than 0"),
        ([{"method": "streaming_llm", "sink": -1}], r"sink: Input should be greater than or equal to 0"),
        ([{"method": "sliding_window", "window": "big"}], r"window: Input should be a valid integer"),
        ([{"method": "strided", "stride": 100}], r"stride \(100\) must be a multiple of block_size \(64\)"),
        ([{"method": "dilated", "segments": []}], r"at least one"),
        ([{"method": "sliding_window"}, {"method": "longformer"}], r"both prefill methods on the same layers"),
        ([], r"steps: List should have at least 1 item"),
        (["sliding_window"], r"must be a mapping with a `method:` key"),
    ],
)
def test_bad_steps_name_the_key(steps, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.load({"attnkit": 1, "name": "bad", "steps": steps})


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("attnkit: 1\nname: x\nsteps:\n  - method: sliding_window\n    window: -5\n")
    with pytest.raises(RecipeError, match=r"mine.yaml: steps\[0\] \(sliding_window\): window"):
        Recipe.load(path)
    path.write_text("name: x\nsteps: []\n")
    with pytest.raises(RecipeError, match="missing `attnkit: 1`"):
        Recipe.load(path)
    path.write_text("attnkit: 2\nname: x\nsteps: [{method: sliding_window}]\n")
    with pytest.raises(RecipeError, match="attnkit: Input should be 1"):
        Recipe.load(path)
    path.write_text("attnkit: 1\nname: x\nstepz: []\n")
    with pytest.raises(RecipeError, match="stepz: unknown key"):
        Recipe.load(path)
    path.write_text("attnkit: [1\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.load(path)


def test_unknown_recipe_and_missing_file():
    with pytest.raises(RecipeError, match=r"unknown recipe 'streaming'.*built-in: .*streaming_llm"):
        Recipe.load("streaming")
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load("no/such/recipe.yaml")


def test_disjoint_layers_compose():
    recipe = Recipe.load(
        {
            "attnkit": 1,
            "name": "mixed",
            "steps": [{"method": "sliding_window", "layers": [0, 1]}, {"method": "streaming_llm", "layers": [2, 3]}],
        }
    )
    assert [s.method_name for s in recipe.steps] == ["sliding_window", "streaming_llm"]


def test_unknown_method_lookup():
    with pytest.raises(UnknownMethodError, match="registered methods"):
        get_method("quest_typo")
