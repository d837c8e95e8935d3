import pytest

from gpt2tune.errors import UserError
from gpt2tune.method import apply_method
from gpt2tune.method.config import PartialMethod


def tiny(n_layer=4):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=30, n_positions=16, n_embd=16, n_layer=n_layer, n_head=2))


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_default_is_last_block_final_norm_head():
    m = apply_method(tiny(), PartialMethod())
    names = trainable(m)
    assert all(n.startswith(("transformer.h.3.", "transformer.ln_f.", "transformer.wte")) for n in names)
    assert "transformer.h.3.attn.c_attn.weight" in names and "transformer.ln_f.weight" in names
    assert not any(n.startswith("transformer.h.2.") for n in names)


def test_freeze_bottom_and_attention_only():
    names = trainable(apply_method(tiny(), PartialMethod(freeze_bottom=3)))
    assert not any(n.startswith(("transformer.h.0.", "transformer.h.2.", "transformer.wpe")) for n in names)
    assert "transformer.h.3.mlp.c_fc.weight" in names
    names = trainable(apply_method(tiny(), PartialMethod(layers="all", modules=["attention"])))
    assert names and all(".attn." in n for n in names) and len(names) == 4 * 4


def test_bottom_and_indices_and_errors():
    names = trainable(apply_method(tiny(), PartialMethod(layers="bottom:1", modules=["mlp"])))
    assert names and all(n.startswith("transformer.h.0.mlp.") for n in names)
    names = trainable(apply_method(tiny(), PartialMethod(layers=[1, -1], modules=["layernorm"])))
    assert {n.split(".")[2] for n in names} == {"1", "3"}
    with pytest.raises(UserError, match="only 4 blocks"):
        apply_method(tiny(), PartialMethod(layers="top:9"))
    with pytest.raises(UserError, match="no trainable parameter"):
        apply_method(tiny(), PartialMethod(layers="none", modules=["attention"]))
