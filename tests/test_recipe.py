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


def test_classification_fields_live_in_their_section_and_old_places_still_load(capsys, monkeypatch):
    from gpt2tune import recipe as rec

    monkeypatch.setattr(rec, "_NOTED", set())
    r = recipe_from_dict({"task": "classification", "data": {"source": "tsv:x", "balance": "undersample",
                                                            "split": [0.6, 0.2, 0.2], "label_field": "y"},
                          "train": {"pretrain_steps": 7, "pretrain_lr": 1e-3}}, ["data.test=tsv:t"])
    c = r.classification
    assert (c.balance, c.split, c.label_field, c.test, c.pretrain_steps, c.pretrain_lr) == \
        ("undersample", [0.6, 0.2, 0.2], "y", "tsv:t", 7, 1e-3)
    assert "balance" not in rec.DataSection.model_fields and "pretrain_steps" not in rec.TrainSection.model_fields
    err = capsys.readouterr().err
    assert "note: recipe field data.balance is now classification.balance" in err
    assert err.count("data.test is now classification.test") == 1
    again = recipe_from_dict({"data": {"source": "tsv:x", "balance": "undersample"}})
    assert again.classification.balance == "undersample" and capsys.readouterr().err == ""  # noted once
    with pytest.raises(UserError, match="data.split and classification.split are both set"):
        recipe_from_dict({"data": {"source": "tsv:x", "split": [0.5, 0.25, 0.25]},
                          "classification": {"split": [0.6, 0.2, 0.2]}})
    new = recipe_from_dict({"data": {"source": "tsv:x"}, "classification": {"split": [0.6, 0.2, 0.2]}})
    assert new.classification.split == [0.6, 0.2, 0.2] and capsys.readouterr().err == ""


def test_every_task_has_a_module_that_runs_it():
    import importlib

    from gpt2tune.recipe import TASKS

    for name, module in TASKS.items():
        assert callable(importlib.import_module(f"gpt2tune.tasks.{module}").run), name
        assert recipe_from_dict({**BASE, "task": name}).task == name
    with pytest.raises(UserError, match="field 'task'"):
        recipe_from_dict({**BASE, "task": "summarize"})
