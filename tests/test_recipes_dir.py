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


def test_seed_setups_as_recipes():
    """The tutorials' hub setups (each also trains against a local hub in tests/test_hub.py)."""
    d = ROOT / "recipes"
    full = load_recipe(d / "tang-uer.yaml")
    assert full.model.name == "uer/gpt2-chinese-cluecorpussmall" and full.method.name == "full"
    cmp = load_recipe(d / "tang-uer-compare.yaml")
    assert cmp.model.name == full.model.name
    assert {m.name for m in cmp.compare.methods} >= {"full", "partial", "lora"}
    chat = load_recipe(d / "chat-ultrachat.yaml")
    assert chat.task == "chat" and chat.model.name == "gpt2"
    assert chat.data.source == "hf:HuggingFaceH4/ultrachat_200k:train_sft"
    assert chat.data.validation == "hf:HuggingFaceH4/ultrachat_200k:test_sft"
    sms = load_recipe(d / "sms-spam-gpt2.yaml")
    assert sms.task == "classification" and sms.model.name == "gpt2" and sms.model.init == "pretrained"
    assert sms.method.name == "partial" and sms.method.layers == "top:1"
    assert set(sms.method.modules) == {"attention", "mlp", "layernorm", "final-norm", "head"}
    en = load_recipe(d / "english-gpt2.yaml")
    assert en.model.name == "gpt2" and en.data.source.startswith("text:")


def test_preference_recipes():
    d = ROOT / "recipes"
    dpo = load_recipe(d / "preference-ultrafeedback.yaml")
    assert dpo.task == "preference" and dpo.preference.loss == "dpo" and dpo.method.name == "lora"
    assert dpo.data.source == "hf:HuggingFaceH4/ultrafeedback_binarized:train_prefs"
    orpo = load_recipe(d / "preference-orpo.yaml")
    assert orpo.task == "preference" and orpo.preference.loss == "orpo" and orpo.method.name == "full"
