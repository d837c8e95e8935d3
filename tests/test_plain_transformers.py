"""RUN/model with plain `transformers`, no gpt2tune: the README's promise, for Chinese character vocabularies.

`BertTokenizer` (what uer/gpt2-chinese-* folders and `tokenizer: from-data` name) ends every prompt
with `[SEP]` (the model reads "the poem is over" before it starts) and decodes with a space between
every character. A run saves its language model's tokenizer so that `pipeline("text-generation")`,
greedy, writes exactly what `gpt2tune generate --greedy` writes. The plain side runs in a subprocess
that imports only `transformers`.
"""

import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from conftest import BERT_ZH, TANG_MINI, ZH_TEXT, need

NEW_TOKENS = 20
MIXED = "白日依山盡 hello world，黃河 abc 入海流。"
HAN = r"[\u4e00-\u9fff\u3000-\u303f\uff00-\uffef]"  # characters and CJK / full-width punctuation

PLAIN = r"""
import json, sys
from transformers import AutoTokenizer, pipeline

out = {}
for folder, prompts in json.loads(sys.argv[1]).items():
    tok = AutoTokenizer.from_pretrained(folder)
    gen = pipeline("text-generation", model=folder, tokenizer=tok)
    out[folder] = {
        "texts": [gen(p, do_sample=False, max_new_tokens=%d)[0]["generated_text"] for p in prompts],
        "prompt_ids": tok("白日")["input_ids"],
        "sep": tok.sep_token_id,
        "cls": tok.cls_token_id,
        "mixed": tok.decode(tok(%r)["input_ids"], skip_special_tokens=True),
        "mixed_ids": tok(%r, add_special_tokens=False)["input_ids"],
    }
assert "gpt2tune" not in sys.modules
print(json.dumps(out, ensure_ascii=False))
""" % (NEW_TOKENS, MIXED, MIXED)


def plain_transformers(folders: dict) -> dict:
    """{folder: prompts} -> what plain transformers does with each folder (in a fresh process)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cwd = os.path.dirname(next(iter(folders)))
    proc = subprocess.run([sys.executable, "-c", PLAIN, json.dumps({str(k): v for k, v in folders.items()})],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def greedy(model, tok, framing, prompts):
    from gpt2tune.generate.sampling import Sampling
    from gpt2tune.generate.text import generate_texts

    samples, _ = generate_texts(model.eval(), tok, framing, prompts, Sampling(max_new_tokens=NEW_TOKENS, greedy=True))
    return [s.text for s in samples]


def tiny_lm(tok, framing, seed=0):
    """A 2-layer GPT-2 whose (untied) head scores only Chinese characters, the other rows zero: random
    weights would otherwise as soon end at once as not, and greedy text should be Chinese."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2tune.data.poetry import is_cjk
    from gpt2tune.model.build import set_special_ids

    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg).eval()
    keep = torch.zeros(len(tok), dtype=torch.bool)
    keep[[i for t, i in tok.get_vocab().items() if len(t) == 1 and is_cjk(t)]] = True
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0.0
    set_special_ids(model, framing)
    return model


def save_run(model, tok, run):
    from gpt2tune.method import save_trained
    from gpt2tune.method.config import FullMethod

    assert save_trained(model, tok, run, FullMethod()) == "model"
    return run / "model"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Runs saved the way training saves RUN/model, what gpt2tune generates from each (in memory, before
    saving), and what plain transformers makes of the saved folders."""
    from gpt2tune.method.io import load_trained
    from gpt2tune.model.tokenizer import build_tokenizer, framing_of, load_tokenizer

    root = tmp_path_factory.mktemp("plain")
    cases = {}
    tok = build_tokenizer(ZH_TEXT * 3, root / "from-data-tokenizer")  # as tokenizer: from-data builds it
    cases["from-data"] = (tok, tiny_lm(tok, framing_of(tok)), ["白日", "春眠"])
    if BERT_ZH.exists():  # the uer models' vocabulary: vocab.txt + BertTokenizer
        tok = load_tokenizer(BERT_ZH)
        cases["bert-base-chinese"] = (tok, tiny_lm(tok, framing_of(tok), seed=1), ["白日", "春眠"])
    if TANG_MINI.exists():  # a pretrained uer-format model, as a run starting from it would save it
        loaded = load_trained(TANG_MINI)
        # 春風: the model writes [UNK] after a few lines, which gpt2tune never generates
        cases["tang-mini"] = (loaded.tokenizer, loaded.model.eval(), ["白日", "春風"])
    out = {}
    for name, (tok, model, prompts) in cases.items():
        out[name] = {"tok": tok, "prompts": prompts, "ours": greedy(model, tok, framing_of(tok), prompts),
                     "folder": save_run(model, tok, root / name)}
    plain = plain_transformers({c["folder"]: c["prompts"] for c in out.values()})
    for c in out.values():
        c["plain"] = plain[str(c["folder"])]
    return out


def _chinese_gap(text: str) -> bool:
    return re.search(f"{HAN} | {HAN}", text) is not None


@pytest.mark.parametrize("case", ["from-data", "bert-base-chinese", "tang-mini"])
def test_pipeline_greedy_writes_what_gpt2tune_writes(saved, case):
    """The README's promise: `pipeline("text-generation", model="RUN/model")`, greedy, gives gpt2tune's
    greedy text: no space between Chinese characters, no [SEP] ending the prompt, no [UNK] written."""
    if case not in saved:
        need(BERT_ZH if case == "bert-base-chinese" else TANG_MINI)
    c = saved[case]
    for prompt, ours, plain in zip(c["prompts"], c["ours"], c["plain"]["texts"]):
        assert ours.startswith(prompt) and len(ours) > len(prompt) + 5, ours  # it wrote Chinese
        assert not _chinese_gap(ours)
        assert not _chinese_gap(plain), plain
        assert plain == ours


@pytest.mark.parametrize("case", ["from-data", "bert-base-chinese", "tang-mini"])
def test_plain_tokenizer_frames_and_decodes_like_gpt2tune(saved, case):
    """`AutoTokenizer` on RUN/model: a prompt is `[CLS] text` (gpt2tune's framing of a prompt, no [SEP]),
    text gets gpt2tune's ids, and decoding keeps English words apart but Chinese characters together."""
    if case not in saved:
        need(BERT_ZH if case == "bert-base-chinese" else TANG_MINI)
    from gpt2tune.model.tokenizer import decode, framing_of

    c, tok = saved[case], saved[case]["tok"]
    plain, fr = c["plain"], framing_of(tok)
    assert plain["prompt_ids"] == [fr.bos] + tok("白日", add_special_tokens=False)["input_ids"]
    assert plain["prompt_ids"][-1] != fr.eos and (plain["cls"], plain["sep"]) == (fr.bos, fr.eos)
    assert plain["mixed_ids"] == tok(MIXED, add_special_tokens=False)["input_ids"]
    assert plain["mixed"] == decode(tok, plain["mixed_ids"])
    assert "hello world" in plain["mixed"] and "白日依山盡" in plain["mixed"]


def test_gpt2tune_reads_the_saved_tokenizer_as_before(saved):
    """gpt2tune loads the saved folder with the same framing, ids and decoded text (streaming too)
    as the tokenizer it was saved from, over random id sequences (bert-base-chinese has an empty
    entry, which leaves a double space that one cleaning pass must leave as gpt2tune always did)."""
    from gpt2tune.generate.detok import Detokenizer
    from gpt2tune.model.tokenizer import decode, framing_of, load_tokenizer

    rng = random.Random(0)
    for case, c in saved.items():
        old, new = c["tok"], load_tokenizer(c["folder"])
        assert framing_of(new) == framing_of(old)
        assert sorted(new.all_special_ids) == sorted(old.all_special_ids) and len(new) == len(old)
        for text in ZH_TEXT + [MIXED, "  a  b 春\n夏\t秋 ", "ＡＢＣ１２３「引號」"]:
            assert new(text, add_special_tokens=False)["input_ids"] == old(text, add_special_tokens=False)["input_ids"]
        empty = [i for i, t in enumerate(old.convert_ids_to_tokens(list(range(len(old))))) if t == ""]
        pool = list(range(len(old))) + empty * 50  # bert-base-chinese: 343, U+202C
        for _ in range(400):
            ids = [rng.choice(pool) for _ in range(rng.randint(1, 12))]
            for skip in (True, False):
                assert decode(new, ids, skip) == decode(old, ids, skip), (case, ids)
            a, b = Detokenizer(old), Detokenizer(new)
            assert [a.push(i) for i in ids] == [b.push(i) for i in ids], (case, ids)


def test_gpt2tune_generates_the_same_from_the_saved_folder(saved):
    """Reloaded through gpt2tune (`load_run`), the saved folder generates what the model did before saving."""
    from gpt2tune.method.io import load_run

    for c in saved.values():
        model, tok, fr = load_run(c["folder"])
        assert greedy(model, tok, fr, c["prompts"]) == c["ours"]


def test_export_folder_works_in_plain_transformers(saved, tmp_path):
    """`gpt2tune export` writes the same plain-transformers tokenizer (re-saving is idempotent)."""
    from gpt2tune.export import export_run

    c = saved.get("tang-mini") or saved["from-data"]
    run = c["folder"].parent
    out = tmp_path / "export"
    export_run(run, out)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        exported, saved_run = ((d / f).read_text(encoding="utf-8") for d in (out, c["folder"]))
        assert json.loads(exported) == json.loads(saved_run), f
    plain = plain_transformers({out: c["prompts"]})[str(out)]
    assert plain["texts"] == c["ours"]


def test_classifier_keeps_cls_text_sep(tmp_path):
    """A classifier was trained on `[CLS] text [SEP]` (`tokenizer(text)`): its folder keeps that framing."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from gpt2tune.model.tokenizer import build_tokenizer, framing_of

    tok = build_tokenizer(ZH_TEXT, tmp_path / "tok")
    fr = framing_of(tok)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1,
                                                     n_head=2, num_labels=2, pad_token_id=fr.pad))
    folder = save_run(model, tok, tmp_path / "run")
    plain = AutoTokenizer.from_pretrained(str(folder))
    framed = [fr.bos] + tok("白日", add_special_tokens=False)["input_ids"] + [fr.eos]
    assert plain("白日")["input_ids"] == tok("白日")["input_ids"] == framed
