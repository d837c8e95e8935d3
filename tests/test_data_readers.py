"""Data readers that used to change data silently: extra CSV/TSV fields, a stray blank line in a
text file, line separators inside JSON strings, classes too small for the split, a header row
given again as data.columns."""

import json
from types import SimpleNamespace

import pytest

from conftest import SMS, need
from gpt2tune.data.sources import SourceOptions, load_source
from gpt2tune.errors import UserError


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- CSV / TSV


def test_csv_row_with_more_fields_than_header_is_an_error_naming_file_and_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\nhi,ham\n"multi\nline",ham\n\nhello, world,ham\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_source(f"csv:{p}")
    # the bad row starts on line 6 (a quoted field spans lines 3-4, line 5 is blank)
    assert one_line_error(e).startswith(f"{p}:6: 3 fields but 2 columns (text, label)")
    # quoted commas are fine; a short row is still skipped and counted (documented behaviour)
    p.write_text('text,label\n"hello, world",ham\nlonely\n', encoding="utf-8")
    loaded = load_source(f"csv:{p}")
    assert loaded.records == [{"text": "hello, world", "label": "ham"}] and loaded.skipped == 1


def test_tsv_row_with_an_extra_tab_is_an_error_and_stray_quotes_stay_text(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text('ham\t"quoted start\nspam\tone\ttwo\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.tsv:2: 3 fields but 2 columns \(label, text\); a tab inside a field"):
        load_source(f"tsv:{p}", SourceOptions(columns=["label", "text"]))
    p.write_text('ham\t"quoted start\nspam\tend quote"\n', encoding="utf-8")
    recs = load_source(f"tsv:{p}", SourceOptions(columns=["label", "text"])).records
    assert [r["text"] for r in recs] == ['"quoted start', 'end quote"']


def test_sms_spam_has_no_row_with_extra_fields():
    p = need(SMS)
    loaded = load_source(f"tsv:{p}", SourceOptions(columns=["label", "text"]))
    assert len(loaded.records) == 5574 and loaded.skipped == 0


def test_header_row_equal_to_given_columns_is_a_header_not_a_sample(tmp_path):
    from gpt2tune.data.labels import read_labeled

    p = tmp_path / "d.csv"
    p.write_text("text,label\ngood film,pos\nbad film,neg\n", encoding="utf-8")
    loaded = load_source(f"csv:{p}", SourceOptions(columns=["text", "label"]))
    assert loaded.records == [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}]
    assert any("first row equals data.columns" in n for n in loaded.notes)
    cfg = SimpleNamespace(field="text", columns=["text", "label"], header=None,
                          text_mode="auto", normalize="nfc", whitespace=True, min_chars=1, max_chars=None,
                          poetry=SimpleNamespace(include_title=False, form=None, simplified=False))
    data = read_labeled(cfg, f"csv:{p}")
    assert data.counts() == {"neg": 1, "pos": 1}  # no sample of class "label"
    # an explicit `header: false` is taken at its word; a header-less file keeps its first row
    assert len(load_source(f"csv:{p}", SourceOptions(columns=["text", "label"], header=False)).records) == 3
    p.write_text("good film,pos\nbad film,neg\n", encoding="utf-8")
    assert len(load_source(f"csv:{p}", SourceOptions(columns=["text", "label"])).records) == 2


# --------------------------------------------------------------------------- text mode


def test_stray_blank_line_does_not_flip_a_line_file_into_documents(tmp_path):
    p = tmp_path / "lines.txt"
    p.write_text("\n".join(f"sample {i}" for i in range(20)) + "\n\n" +
                 "\n".join(f"sample {i}" for i in range(20, 40)) + "\n", encoding="utf-8")
    loaded = load_source(f"text:{p}")
    assert [r["text"] for r in loaded.records] == [f"sample {i}" for i in range(40)]
    assert loaded.text_mode == "lines"
    assert len(loaded.notes) == 1 and "text_mode auto -> lines (1 blank-line separators" in loaded.notes[0]


def test_blank_line_separated_documents_are_still_found(tmp_path):
    p = tmp_path / "docs.txt"
    docs = [f"title {i}\nline a{i}\nline b{i}" for i in range(5)]
    p.write_text("\n\n".join(docs[:3]) + "\n  \n" + "\n\n\n".join(docs[3:]) + "\n", encoding="utf-8")
    loaded = load_source(f"text:{p}")
    assert [r["text"] for r in loaded.records] == docs  # a blank line holding spaces separates too
    assert loaded.text_mode == "documents" and "auto -> documents (4 blank-line separators" in loaded.notes[0]
    # an explicit mode is used as given, with no note
    loaded = load_source(f"text:{p}", SourceOptions(text_mode="lines"))
    assert len(loaded.records) == 15 and loaded.text_mode == "lines" and loaded.notes == []


def test_text_mode_decision_goes_to_data_json_stats(tmp_path):
    from gpt2tune.tasks.common import train_val_texts

    p = tmp_path / "lines.txt"
    p.write_text("one\ntwo\n\nthree\nfour\n", encoding="utf-8")
    cfg = SimpleNamespace(field="text", columns=None, header=None, text_mode="auto",
                          poetry=SimpleNamespace(include_title=False, form=None, simplified=False),
                          normalize="nfc", whitespace=True, min_chars=1, max_chars=None, dedupe=False,
                          source=f"text:{p}", validation=None, val_fraction=0.25, seed=1, limit=None)
    _, _, stats = train_val_texts(cfg)  # causal-lm writes these stats to RUN/data.json as they are
    assert stats["text_mode"] == "lines" and stats["train_samples"] + stats["validation_samples"] == 4
    assert "text_mode auto -> lines" in stats["notes"][0]
    p.write_text("one\ntwo\n\n", encoding="utf-8")  # no blank line between samples: nothing to note
    _, _, stats = train_val_texts(cfg)
    assert stats["text_mode"] == "lines" and "notes" not in stats


# --------------------------------------------------------------------------- line separators


SEPARATORS = "a\u2028b\u2029c\u0085d"


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    p = tmp_path / "d.jsonl"
    recs = [{"text": "line\u2028sep and next\u0085line", "n": 1}, {"text": SEPARATORS, "n": 2}]
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in recs), encoding="utf-8")
    assert "\u2028" in p.read_text(encoding="utf-8")  # written raw, as json.dumps(ensure_ascii=False) does
    assert load_source(f"jsonl:{p}").records == recs
    # line numbers in errors count "\n" lines only
    p.write_text(json.dumps(recs[0], ensure_ascii=False) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.jsonl:2: broken JSON"):
        load_source(f"jsonl:{p}")


def test_text_and_tables_keep_unicode_line_separators_inside_a_line(tmp_path):
    """Guard (no fix needed): text and CSV/TSV readers already split on "\\n" only."""
    t = tmp_path / "d.txt"
    t.write_text(f"{SEPARATORS}\nplain\n", encoding="utf-8")
    assert [r["text"] for r in load_source(f"text:{t}").records] == [SEPARATORS, "plain"]
    docs = [f"doc {i}\n{SEPARATORS}" for i in range(4)]
    t.write_text("\n\n".join(docs), encoding="utf-8")
    assert [r["text"] for r in load_source(f"text:{t}", SourceOptions(text_mode="documents")).records] == docs
    c = tmp_path / "d.csv"
    c.write_text(f"text,label\n{SEPARATORS},x\n", encoding="utf-8")
    assert load_source(f"csv:{c}").records == [{"text": SEPARATORS, "label": "x"}]
    c = tmp_path / "d.tsv"
    c.write_text(f"text\tlabel\n{SEPARATORS}\tx\n", encoding="utf-8")
    assert load_source(f"tsv:{c}").records == [{"text": SEPARATORS, "label": "x"}]


# --------------------------------------------------------------------------- classification split


def labelled_tsv(path, counts):
    path.write_text("".join(f"{label}\t{label} text number {i}\n" for label, n in counts.items() for i in range(n)),
                    encoding="utf-8")
    return path


def sections(tmp_path, split=(0.7, 0.1, 0.2), balance="none", test=None, **data):
    """The data and classification sections of a classification recipe."""
    from gpt2tune.recipe import recipe_from_dict

    r = recipe_from_dict({"task": "classification", "data": {"columns": ["label", "text"], "seed": 3, **data},
                          "classification": {"split": list(split), "balance": balance, "test": test}})
    return r.data, r.classification


def test_split_leaving_a_class_without_validation_or_test_is_an_error(tmp_path):
    from gpt2tune.tasks.classification import load_splits

    src = labelled_tsv(tmp_path / "d.tsv", {"ham": 40, "spam": 2})
    with pytest.raises(UserError) as e:
        load_splits(*sections(tmp_path, source=f"tsv:{src}"))
    assert one_line_error(e) == ("class 'spam' has 2 samples; classification.split [0.7, 0.1, 0.2] needs at least 6 per "
                                 "class for non-empty validation and test; add data or change classification.split")
    # tiny data balanced down: every part of the split would be empty for both classes
    src = labelled_tsv(tmp_path / "d.tsv", {"ham": 40, "spam": 4})
    with pytest.raises(UserError, match=r"^class 'ham' has 4 samples, class 'spam' has 4 samples "
                                        r"\(after classification.balance: undersample\); .* at least 6 per class"):
        load_splits(*sections(tmp_path, source=f"tsv:{src}", balance="undersample"))
    # enough samples: every class in every part
    src = labelled_tsv(tmp_path / "d.tsv", {"ham": 40, "spam": 6})
    splits = load_splits(*sections(tmp_path, source=f"tsv:{src}"))
    assert splits.stats["counts"]["validation"] == {"ham": 4, "spam": 1}
    assert splits.stats["counts"]["test"] == {"ham": 8, "spam": 1}


def test_split_check_spares_parts_given_as_files_or_set_to_zero(tmp_path):
    from gpt2tune.tasks.classification import load_splits

    src = labelled_tsv(tmp_path / "d.tsv", {"ham": 40, "spam": 2})
    val = labelled_tsv(tmp_path / "v.tsv", {"ham": 2, "spam": 2})
    test = labelled_tsv(tmp_path / "t.tsv", {"ham": 3, "spam": 3})
    splits = load_splits(*sections(tmp_path, source=f"tsv:{src}", validation=f"tsv:{val}", test=f"tsv:{test}"))
    assert splits.stats["counts"]["train"] == {"ham": 40, "spam": 2}
    # only the part still cut from the source is checked, and named
    with pytest.raises(UserError, match=r"class 'spam' has 2 samples; classification.split \[0.7, 0.1, 0.2\] needs at least 3 "
                                        r"per class for non-empty test;"):
        load_splits(*sections(tmp_path, source=f"tsv:{src}", validation=f"tsv:{val}"))
    splits = load_splits(*sections(tmp_path, source=f"tsv:{src}", split=[0.9, 0.1, 0.0], test=None,
                                      validation=f"tsv:{val}"))
    assert splits.stats["counts"]["test"] == {}


def test_too_small_split_stops_the_cli_with_one_line(tmp_path, run_cli):
    from conftest import write_recipe

    src = labelled_tsv(tmp_path / "d.tsv", {"ham": 40, "spam": 2})
    recipe = write_recipe(tmp_path / "r.yaml", f"""
task: classification
model: {{init: scratch, size: nano, tokenizer: from-data, vocab_size: 300, n_positions: 64}}
data: {{source: "tsv:{src}", columns: [label, text], max_length: 32}}
train: {{precision: fp32, epochs: 1, num_threads: 1}}
output: {{dir: "{tmp_path / 'run'}"}}
""")
    code, _, err = run_cli("train", recipe, "--no-progress")
    assert code == 2 and err.strip().splitlines() == [
        "gpt2tune: error: class 'spam' has 2 samples; classification.split [0.7, 0.1, 0.2] needs at least 6 per "
        "class for non-empty validation and test; add data or change classification.split"]


@pytest.mark.parametrize("kind,mode", [("text", "lines"), ("text", "auto"), ("jsonl", None), ("csv", None),
                                       ("tsv", None)])
def test_streamed_readers_hold_one_line_not_the_file(tmp_path, kind, mode):
    """iter_records reads text:, jsonl:, csv: and tsv: a line at a time: walking 4 MB of records
    allocates well under a megabyte at any moment (a reader that splits the whole file would hold all
    of it), and gives the records load_source gives."""
    import tracemalloc

    from gpt2tune.data.sources import Loaded, iter_records

    f = tmp_path / f"big.{kind}"
    texts = [f"第{i}行 白日依山盡，黃河入海流。欲窮千里目，更上一層樓。" for i in range(60_000)]
    last = {"text": texts[-1]}
    if kind == "jsonl":
        lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    elif kind == "csv":  # quoted fields, one spanning two lines
        lines = ["id,text"] + [f'{i},"{t}"' for i, t in enumerate(texts[:-1])] + [f'{len(texts) - 1},"{texts[-1]}\nend"']
        last = {"id": str(len(texts) - 1), "text": texts[-1] + "\nend"}
    elif kind == "tsv":
        lines = ["label\ttext"] + [f"ham\t{t}" for t in texts]
        last = {"label": "ham", "text": texts[-1]}
    else:
        lines = texts
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert f.stat().st_size > 4e6
    opts = SourceOptions(text_mode=mode or "auto")
    info = Loaded([])
    tracemalloc.start()
    n = sum(1 for _ in iter_records(f"{kind}:{f}", opts, info))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 60_000 and peak < 1e6, peak
    assert load_source(f"{kind}:{f}", opts).records[-1] == last
