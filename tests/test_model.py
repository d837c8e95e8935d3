import logging
import shutil

import pytest

from conftest import BERT_ZH, GPT2_BPE, TANG_MINI, ZH_TEXT, need
from gpt2tune.errors import UserError
from gpt2tune.model.build import build_scratch, load_pretrained, scratch_config
from gpt2tune.model.resolve import resolve_model_dir
from gpt2tune.model.tokenizer import build_tokenizer, decode, framing_of, load_tokenizer


def test_gpt2_bpe_through_our_loader():
    tok = load_tokenizer(need(GPT2_BPE))
    assert tok("Every effort moves you", add_special_tokens=False)["input_ids"] == [6109, 3626, 6100, 345]
    fr = framing_of(tok)
    assert fr.eos == 50256 and fr.bos == 50256 and fr.pad == 50256 and not fr.bert_style


def test_bert_chinese_vocab_and_decode_without_spaces():
    tok = load_tokenizer(need(BERT_ZH))
    fr = framing_of(tok)
    assert (fr.bos, fr.eos, fr.pad, fr.bert_style) == (101, 102, 0, True)
    ids = tok("白日依山尽，abc 12", add_special_tokens=False)["input_ids"]
    assert decode(tok, [101] + ids + [102, 0]) == "白日依山尽，abc 12"


def test_from_data_chinese_is_char_bert_vocab(tmp_path):
    tok = build_tokenizer(ZH_TEXT, tmp_path)
    assert type(tok).__name__ == "BertTokenizer"
    vocab = (tmp_path / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ids = tok(ZH_TEXT[0], add_special_tokens=False)["input_ids"]
    assert len(ids) == len(ZH_TEXT[0]) and tok.unk_token_id not in ids
    assert decode(tok, ids) == ZH_TEXT[0]
    again = load_tokenizer(tmp_path)
    assert again(ZH_TEXT[1])["input_ids"] == tok(ZH_TEXT[1])["input_ids"]


def test_from_data_english_is_byte_level_bpe(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog"] * 50 + ["every effort moves you forward"] * 50
    tok = build_tokenizer(texts, tmp_path, vocab_size=300)
    fr = framing_of(tok)
    assert tok.convert_ids_to_tokens(fr.eos) == "<|endoftext|>"
    s = "the lazy fox moves"
    assert decode(tok, tok(s, add_special_tokens=False)["input_ids"]) == s


def _fake_cache(root, repo, src):
    snap = root / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, snap / f.name)
    (root / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (root / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("0123abcd")
    return snap


def test_hub_id_resolves_from_fake_cache_offline(tmp_path, monkeypatch, tiny_zh_model):
    snap = _fake_cache(tmp_path / "hub", "someone/tiny-zh", tiny_zh_model)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_dir("someone/tiny-zh") == snap
    assert resolve_model_dir(str(snap)) == snap  # a snapshot folder works as a plain folder
    with pytest.raises(UserError, match="not in the Hugging Face cache.*run once with internet access"):
        resolve_model_dir("someone/absent")


def test_missing_folder_and_not_a_model(tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        resolve_model_dir(str(tmp_path / "a" / "b" / "c"))
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_dir(str(tmp_path))


def test_vocab_larger_than_embeddings_is_error(tmp_path, zh_tokenizer_dir):
    tok = load_tokenizer(zh_tokenizer_dir)
    model = build_scratch("nano", 10, framing_of(tok), n_positions=32)
    model.save_pretrained(str(tmp_path))
    with pytest.raises(UserError, match=r"tokenizer has \d+ tokens but the model's embeddings only 10"):
        load_pretrained(tmp_path, framing_of(tok), len(tok))


def test_scratch_sizes():
    cfg = scratch_config("small", 50257)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions) == (12, 12, 768, 1024)
    assert scratch_config("xl", 50257).n_embd == 1600
    with pytest.raises(UserError, match="valid sizes"):
        scratch_config("huge", 10)


def test_tang_mini_special_ids_from_tokenizer_and_no_warning(capfd, caplog):
    folder = need(TANG_MINI)
    caplog.set_level(logging.WARNING)
    tok = load_tokenizer(folder)
    fr = framing_of(tok)
    model = load_pretrained(folder, fr, len(tok))
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (101, 102, 0)
    assert model.generation_config.eos_token_id == 102
    err = capfd.readouterr().err
    assert "50256" not in err and "50256" not in caplog.text
