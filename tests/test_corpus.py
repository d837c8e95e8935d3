"""Corpus scale: a text source tokenized once into a memory-mapped cache, reused while nothing
changes, rebuilt when anything that changes its tokens does, read by the training loop batch by batch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BERT_ZH, GPT2_BPE, POEMS, ROOT, SMS, TANG_MINI, ZH_TEXT, need, write_recipe

RECIPE = """
task: causal-lm
model: {{init: scratch, size: nano, tokenizer: {tok}}}
data: {{source: "{src}", val_fraction: 0.1, max_length: {max_length}, batching: {batching}, cache_dir: "{cache}",
        num_proc: {procs}}}
train: {{precision: fp32, lr: 2.0e-3, batch_size: 4, max_steps: {steps}, save_every: {save}, log_every: 5, seed: 3,
         num_threads: 1, keep_checkpoints: 50}}
output: {{dir: "{out}"}}
"""

LINES = [t + str(i % 7) for i in range(40) for t in ZH_TEXT]  # 160 samples, some repeated


def corpus_file(tmp_path, lines=LINES, name="poems.txt") -> Path:
    f = tmp_path / name
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f


def make_recipe(tmp_path, name="r", src=None, tok="from-data", max_length=40, batching="pack", procs=1, steps=4,
                save=0, cache=None):
    from gpt2tune.recipe import load_recipe

    src = src or f"text:{corpus_file(tmp_path) if not (tmp_path / 'poems.txt').exists() else tmp_path / 'poems.txt'}"
    path = write_recipe(tmp_path / f"{name}.yaml", RECIPE.format(
        tok=tok, src=src, max_length=max_length, batching=batching, cache=cache or tmp_path / "cache", procs=procs,
        steps=steps, save=save, out=tmp_path / name))
    return path, load_recipe(path)


@pytest.fixture
def count_builds(monkeypatch):
    """How many times the corpus was read and tokenized (tokenize_splits calls)."""
    import gpt2tune.data.corpus as corpus

    calls = []
    real = corpus.tokenize_splits

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(corpus, "tokenize_splits", counting)
    return calls


def test_second_run_reads_the_cache_without_tokenizing(tmp_path, count_builds, monkeypatch):
    from gpt2tune.tasks import causal_lm

    _, r = make_recipe(tmp_path)
    a = causal_lm.prepare_corpus(r, progress=False)
    assert not a.hit and len(count_builds) == 1
    # a hit neither reads the source nor calls a tokenizer
    monkeypatch.setattr(causal_lm, "train_val_texts", lambda *x: pytest.fail("source read again"))
    b = causal_lm.prepare_corpus(r, progress=False)
    assert b.hit and b.folder == a.folder and len(count_builds) == 1
    assert b.train.tokens.dtype == np.uint16 and isinstance(b.train.tokens, np.memmap)
    assert [b.train[i] for i in range(len(b.train))] == [a.train[i] for i in range(len(a.train))]
    # batching does not change tokens: same entry
    _, r2 = make_recipe(tmp_path, batching="group")
    assert causal_lm.prepare_corpus(r2, progress=False).folder == a.folder and len(count_builds) == 1


def test_changed_file_or_setting_or_tokenizer_rebuilds(tmp_path, count_builds):
    from gpt2tune.tasks import causal_lm

    path, r = make_recipe(tmp_path)
    first = causal_lm.prepare_corpus(r, progress=False)
    folders = {first.folder}
    for change in ({"max_length": 30}, {"tok": f'"{need(BERT_ZH)}"'}):
        _, rc = make_recipe(tmp_path, name="c", **change)
        got = causal_lm.prepare_corpus(rc, progress=False)
        assert not got.hit and got.folder not in folders, change
        folders.add(got.folder)
    _, rc = make_recipe(tmp_path, name="n")
    rc.data.normalize = "none"
    assert not causal_lm.prepare_corpus(rc, progress=False).hit
    # same size, one character changed (and a later mtime): rebuilt, with the new text's tokens
    f = tmp_path / "poems.txt"
    text = f.read_text(encoding="utf-8")
    f.write_text(text.replace("白", "黑", 1), encoding="utf-8")
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    again = causal_lm.prepare_corpus(r, progress=False)
    assert not again.hit and again.folder not in folders
    assert len(count_builds) == 5


def test_cache_holds_what_in_memory_tokenization_gives(tmp_path):
    """Documents, split, counts (data.json) equal the in-memory path's; uint32 past 65,535 tokens."""
    from gpt2tune.data.dataset import tokenize_texts
    from gpt2tune.model.tokenizer import framing_of, load_tokenizer
    from gpt2tune.tasks import causal_lm
    from gpt2tune.tasks.common import train_val_texts

    # a character vocabulary of 70,000 entries: ids no longer fit uint16
    chars = sorted({c for t in LINES for c in t})
    fill = [f"##x{i}" for i in range(70000 - 5 - len(chars))]
    big = tmp_path / "bigtok"
    big.mkdir()
    (big / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *fill, *chars]) + "\n",
                                   encoding="utf-8")
    _, r = make_recipe(tmp_path, tok=f'"{big}"', max_length=12)
    r.data.long_samples = "split"
    c = causal_lm.prepare_corpus(r, progress=False)
    assert c.train.tokens.dtype == np.uint32 and c.train.max_len <= 12
    tok = load_tokenizer(big)
    fr = framing_of(tok)
    train, val, stats = train_val_texts(r.data)
    want_train, cut = tokenize_texts(tok, train, fr.bos, fr.eos, 12, True)
    want_val, _ = tokenize_texts(tok, val, fr.bos, fr.eos, 12, True)
    assert max(max(s) for s in want_train) >= 65536
    assert list(c.train) == want_train and list(c.val) == want_val
    stats.update(truncated=cut, train_tokens=sum(map(len, want_train)))
    assert c.stats == stats


def test_parallel_tokenization_equals_one_process_and_shows_progress(tmp_path, capfd, monkeypatch):
    import gpt2tune.data.corpus as corpus
    from gpt2tune.tasks import causal_lm

    _, r1 = make_recipe(tmp_path, cache=tmp_path / "c1")
    _, r2 = make_recipe(tmp_path, cache=tmp_path / "c2", procs=2)
    monkeypatch.setattr(corpus, "CHUNK", 7)  # many chunks, finished in any order by the workers
    a = causal_lm.prepare_corpus(r1, progress=False)
    capfd.readouterr()
    b = causal_lm.prepare_corpus(r2, progress=True)
    err = capfd.readouterr().err
    assert "tokenizing (2 proc)" in err and "B/s" in err and "100%" in err
    for name in ("train.tokens.bin", "train.offsets.bin", "val.tokens.bin", "val.offsets.bin"):
        assert (a.folder / name).read_bytes() == (b.folder / name).read_bytes(), name
    assert a.folder.name == b.folder.name  # num_proc is not in the key


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, capfd, damage):
    from gpt2tune.errors import UserError
    from gpt2tune.tasks import causal_lm

    _, r = make_recipe(tmp_path)
    good = causal_lm.prepare_corpus(r, progress=False)
    want = list(good.train)
    del good
    folder = next((tmp_path / "cache").glob("[0-9a-f]*"))
    tokens = folder / "train.tokens.bin"
    raw = bytearray(tokens.read_bytes())
    if damage == "truncate":
        tokens.write_bytes(raw[:-6])
    elif damage == "flip":
        raw[10] ^= 0x01
        tokens.write_bytes(raw)
    else:
        (folder / "meta.json").write_text("{", encoding="utf-8")
    with pytest.raises(UserError, match="damaged"):  # a process that may not build says so
        causal_lm.prepare_corpus(r, progress=False, build=False)
    capfd.readouterr()
    again = causal_lm.prepare_corpus(r, progress=False)
    assert "damaged" in capfd.readouterr().err
    assert not again.hit and list(again.train) == want
    assert causal_lm.prepare_corpus(r, progress=False).hit


def test_other_ranks_read_what_rank0_built(tmp_path):
    from gpt2tune.errors import UserError
    from gpt2tune.tasks import causal_lm

    _, r = make_recipe(tmp_path)
    with pytest.raises(UserError, match="missing"):
        causal_lm.prepare_corpus(r, progress=False, build=False)
    built = causal_lm.prepare_corpus(r, progress=False)
    read = causal_lm.prepare_corpus(r, progress=False, build=False)
    assert read.hit and read.folder == built.folder


@pytest.mark.parametrize("mode", ["pad", "group", "pack"])
def test_batches_from_the_memory_map_equal_batches_from_lists(mode):
    """The epoch plan is a pure function of (seed, epoch) and the lengths: a TokenStore and the same
    rows as lists give the same batches (and packed rows the same document starts)."""
    import random

    from gpt2tune.data.cache import TokenStore
    from gpt2tune.data.dataset import Packed, epoch_batches

    rng = random.Random(5)
    seqs = [[rng.randrange(1, 900) for _ in range(rng.randint(1, 40))] for _ in range(300)]
    store = TokenStore.from_lists(seqs, np.uint16)
    for epoch in range(3):
        a = epoch_batches(seqs, 8, mode, 11, epoch, 16)
        b = epoch_batches(store, 8, mode, 11, epoch, 16)
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert [list(r) for r in x] == [list(r) for r in y]
            if mode == "pack":
                assert all(isinstance(r, Packed) and r.starts == s.starts for r, s in zip(x, y))
    if mode == "pack":  # every token of the epoch once, rows of exactly `block` but the last
        rows = [r for bt in epoch_batches(store, 8, mode, 11, 0, 16) for r in bt]
        assert sum(map(len, rows)) == store.total_tokens and all(len(r) == 16 for r in rows[:-1])
    assert [list(r) for r in epoch_batches(store, 8, mode, 11, 0, 16)[0]] != \
           [list(r) for r in epoch_batches(store, 8, mode, 11, 1, 16)[0]]


def test_data_prepare_then_train_reads_the_cache(tmp_path, run_cli):
    path, _ = make_recipe(tmp_path, steps=3)
    code, out, err = run_cli("data", "prepare", path, "--no-progress")
    assert code == 0, err
    assert out.startswith("built: ")
    code, out, err = run_cli("data", "prepare", path, "--json")
    assert code == 0 and json.loads(out)["built"] is False
    code, out, err = run_cli("train", path, "--no-progress")
    assert code == 0, err
    assert "data: cached" in err
    stats = json.loads((tmp_path / "r" / "data.json").read_text())
    assert stats["cache"]["hit"] is True and stats["train_samples"] == 144 and stats["validation_samples"] == 16
    assert (tmp_path / "r" / "tokenizer" / "vocab.txt").is_file()  # from-data: the entry's tokenizer
    code, out, err = run_cli("data", "prepare", path, "--set", "data.source=builtin:tang-lvshi")
    assert code == 2 and "is not cached" in err and len(err.strip().splitlines()) == 1


def gpt2tune(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "gpt2tune", *map(str, args), "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_from_the_memory_map_is_bit_identical(tmp_path):
    """Packed batches read from the cache, over several epochs: a run killed after a checkpoint and
    resumed ends with the uninterrupted run's exact weights."""
    from safetensors.torch import load_file

    corpus_file(tmp_path)
    ref, _ = make_recipe(tmp_path, name="ref", steps=30, save=5, batching="pack")
    crash, _ = make_recipe(tmp_path, name="crash", steps=30, save=5, batching="pack")
    p = gpt2tune("train", ref)
    assert p.wait(timeout=300) == 0, p.communicate()[1][-2000:]
    q = gpt2tune("train", crash)
    ck = tmp_path / "crash" / "checkpoints"
    t0 = time.time()
    while not (ck / "step-10").exists():
        assert q.poll() is None, q.communicate()[1][-2000:]
        assert time.time() - t0 < 200
        time.sleep(0.05)
    q.send_signal(signal.SIGKILL)
    q.wait()
    assert not (tmp_path / "crash" / "model").exists()
    q = gpt2tune("train", crash, "--resume")
    out, err = q.communicate(timeout=300)
    assert q.returncode == 0, err[-2000:]
    assert "resumed from" in err and "data: cached" in err
    data = json.loads((tmp_path / "ref" / "data.json").read_text())
    assert data["train_tokens"] < 30 * 4 * 40  # 30 steps of 4 packed rows of 40 tokens: over an epoch
    a = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "crash" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dedupe_and_counts_survive_the_cache(tmp_path, run_cli):
    """data.dedupe (by a hash of the cleaned text) and the data.json counts of a cached run equal
    those of the in-memory path."""
    from gpt2tune.data.clean import clean_all

    texts, st = clean_all(["甲乙", "甲乙 ", "丙", "甲乙", "丁" * 5000, "丁" * 5000, "丁" * 4999 + "戊"], dedupe=True)
    assert texts == ["甲乙", "丙", "丁" * 5000, "丁" * 4999 + "戊"] and st["duplicates"] == 3
    path, _ = make_recipe(tmp_path, steps=1)
    counts = {}
    for cache in ("true", "false"):
        code, _, err = run_cli("train", path, "--no-progress", "--overwrite", "--set", "data.dedupe=true",
                               "--set", f"data.cache={cache}")
        assert code == 0, err
        counts[cache] = json.loads((tmp_path / "r" / "data.json").read_text())
    assert counts["true"].pop("cache")["hit"] is False
    assert counts["true"] == counts["false"]
    assert counts["true"]["duplicates"] == 160 - 28 and counts["true"]["train_samples"] == 25


@pytest.mark.parametrize("validation", [False, True])
def test_streamed_build_equals_the_in_memory_path(tmp_path, monkeypatch, validation):
    """A source read a line at a time, cleaned and deduplicated by the workers (repeats across chunks
    and processes), split, limited: the documents and every data.json count equal the in-memory path's."""
    need(BERT_ZH)
    import gpt2tune.data.corpus as corpus
    from gpt2tune.data.dataset import tokenize_texts
    from gpt2tune.model.tokenizer import framing_of, load_tokenizer
    from gpt2tune.tasks import causal_lm
    from gpt2tune.tasks.common import train_val_texts

    lines = [f"{t}{i % 9}" for i in range(30) for t in ZH_TEXT] + ["甲", "  " + ZH_TEXT[0] + "0  ", "丁" * 90]
    lines += ["", "   ", "\u3000"] + [ZH_TEXT[1] * 3 + str(i) for i in range(5)]
    src = corpus_file(tmp_path, lines)
    val = corpus_file(tmp_path, [ZH_TEXT[2] + "x", ZH_TEXT[2] + "x", ZH_TEXT[3]], "val.txt")
    _, r = make_recipe(tmp_path, src=f"text:{src}", tok=f'"{BERT_ZH}"', max_length=16, procs=2)
    r.data.long_samples, r.data.dedupe, r.data.min_chars, r.data.max_chars = "split", True, 2, 80
    if validation:
        r.data.validation, r.data.limit = f"text:{val}", 7
    monkeypatch.setattr(corpus, "CHUNK", 5)
    c = causal_lm.prepare_corpus(r, progress=False)
    tok = load_tokenizer(BERT_ZH)
    fr = framing_of(tok)
    train, val_texts, stats = train_val_texts(r.data)
    want_train, cut = tokenize_texts(tok, train, fr.bos, fr.eos, 16, True)
    want_val, cut_val = tokenize_texts(tok, val_texts, fr.bos, fr.eos, 16, True)
    assert len(want_train) > len(train)  # some texts were split
    assert list(c.train) == want_train and list(c.val) == want_val
    stats.update(truncated=cut + cut_val, train_tokens=sum(map(len, want_train)))
    assert c.stats == stats
    assert stats["duplicates"] >= 30 * len(ZH_TEXT) - 9 * len(ZH_TEXT) and stats["too_short"] == 1
    assert stats["too_long"] == 1
    assert not list(c.folder.glob("all.*"))


@pytest.mark.parametrize("which", ["bert-zh", "gpt2-bpe", "tang-mini"])
def test_direct_rust_encoding_equals_the_transformers_call(which):
    """The corpus builder calls the Rust tokenizer directly (the fast path is taken) and gets exactly
    the ids of tok(texts, add_special_tokens=False, split_special_tokens=True): real poems and SMS,
    special-token strings as text, odd Unicode."""
    folder = {"bert-zh": BERT_ZH, "gpt2-bpe": GPT2_BPE, "tang-mini": TANG_MINI}[which]
    for p in (folder, POEMS, SMS):
        need(p)
    from gpt2tune.data.corpus import encoder
    from gpt2tune.model.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    texts = ["".join(p["paragraphs"]) for f in sorted(POEMS.glob("poet.tang.*.json"))[:2]
             for p in json.loads(f.read_text(encoding="utf-8"))]
    texts += [line.split("\t", 1)[1] for line in SMS.read_text(encoding="utf-8").splitlines()[:3000]]
    texts += ["[SEP] x [CLS]", "a<|endoftext|>b", "x [UNK] y [PAD][MASK]", "héllo ÅÉ ﬁ Ⅻ ①", "日本語 한국어 😀",
              "  two  spaces\tand\ttabs  ", "", "\u200b\u3000"]
    fast = encoder(tok, texts[:64])
    assert fast.__qualname__.startswith("encoder")  # the direct path, not the transformers call
    want = tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert fast(texts) == [list(x) for x in want]


def test_vectorised_framing_equals_framing_each_text():
    """frame_all (texts that fit framed in one numpy pass, the rest one by one) gives exactly the
    pieces of `frame` on every text, in order: random lengths, markers present or not, split or cut."""
    import random

    from gpt2tune.data.corpus import frame_all
    from gpt2tune.data.dataset import frame

    rng = random.Random(0)
    for _ in range(300):
        enc = [[rng.randrange(1000) for _ in range(rng.choice([0, 1, 3, 10, 20, 40]))] for _ in range(rng.randrange(30))]
        bos, eos = rng.choice([None, 5]), rng.choice([None, 7])
        max_length, split = rng.choice([3, 12, 25, 50]), rng.random() < 0.5
        flat, lengths, per_text, cut = frame_all(enc, bos, eos, max_length, split, np.uint16)
        framed = [frame(list(e), bos, eos, max_length, split) for e in enc]
        pieces = [p for got, _ in framed for p in got]
        assert flat.tolist() == [t for p in pieces for t in p]
        assert lengths.tolist() == [len(p) for p in pieces]
        assert per_text.tolist() == [len(got) for got, _ in framed] and cut.tolist() == [c for _, c in framed]
