import pytest
import yaml

from gpt2tune.errors import UserError
from gpt2tune.recipe import dump_recipe, load_recipe, recipe_from_dict

BASE = {"data": {"source": "text:x.txt"}}


def test_defaults_and_override():
    r = recipe_from_dict(BASE, ["train.lr=3e-5", "model.size=nano", "data.poetry.form=qiyan-jueju", "train.betas=[0.8, 0.9]"])
    assert r.train.lr == pytest.approx(3e-5)
    assert r.model.size == "nano"
    assert r.data.poetry.form == "qiyan-jueju"
    assert r.train.betas == (0.8, 0.9)
    assert r.task == "causal-lm" and r.method.name == "full"


def test_unknown_key_names_field_and_lists_valid():
    with pytest.raises(UserError) as e:
        recipe_from_dict({"data": {"source": "text:x"}, "train": {"lrr": 1e-3}})
    msg = str(e.value)
    assert "train.lrr" in msg and "lr" in msg and "batch_size" in msg


def test_wrong_type_and_bad_values():
    with pytest.raises(UserError, match="train.batch_size"):
        recipe_from_dict({**BASE, "train": {"batch_size": "many"}})
    with pytest.raises(UserError, match="train.batch_size"):
        recipe_from_dict({**BASE, "train": {"batch_size": 0}})
    for lr in (0, -1e-4):
        with pytest.raises(UserError, match="train.lr"):
            recipe_from_dict({**BASE, "train": {"lr": lr}})
    with pytest.raises(UserError, match="missing required field 'data'"):
        recipe_from_dict({})


def test_set_on_missing_field_is_error():
    with pytest.raises(UserError, match="no field 'nope'.*valid fields: .*lr"):
        recipe_from_dict(BASE, ["train.nope=1"])
    with pytest.raises(UserError, match="FIELD=VALUE"):
        recipe_from_dict(BASE, ["train.lr"])


def test_roundtrip(tmp_path):
    r = recipe_from_dict(BASE, ["train.max_steps=7"])
    dump_recipe(r, tmp_path / "r.yaml")
    again = load_recipe(tmp_path / "r.yaml")
    assert again == r
    assert yaml.safe_load((tmp_path / "r.yaml").read_text())["train"]["max_steps"] == 7


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "none.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(p)
