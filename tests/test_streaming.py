"""data.streaming: a source read as a stream (datasets' streaming mode), cleaned, tokenized and packed on
the fly, shuffled in windows, never held whole; a resumed run goes on at the saved position exactly."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import ZH_TEXT, write_recipe

pytest.importorskip("datasets")

RECIPE = """
task: causal-lm
model: {{name: "{model}"}}
data: {{source: "{src}", streaming: true, max_length: 32, shuffle_buffer: 7, val_documents: 6, cache_dir: "{cache}"{extra}}}
train: {{precision: fp32, lr: 2.0e-3, batch_size: 4, max_steps: {steps}, save_every: 6, log_every: 6, seed: 3,
         num_threads: 1, keep_checkpoints: 50}}
output: {{dir: "{out}"}}
"""


def documents(n: int) -> list[str]:
    """n documents of 1 to 3 poem fragments (6 to 23 characters each): lengths vary, rows cut them."""
    return ["".join(ZH_TEXT[(i + k) % 4][: 6 + (i * 7 + k) % 18] for k in range(1 + i % 3)) for i in range(n)]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def recipe(tmp_path, model, name, steps=24, src=None, extra=""):
    src = src or f"jsonl:{tmp_path / 'docs.jsonl'}"
    if not (tmp_path / "docs.jsonl").exists():
        write_jsonl(tmp_path / "docs.jsonl", documents(60))
    return write_recipe(tmp_path / f"{name}.yaml", RECIPE.format(model=model, src=src, cache=tmp_path / "cache",
                                                                 extra=extra, steps=steps, out=tmp_path / name))


def train(path, *args) -> int:
    from gpt2tune.cli import main

    return main(["train", str(path), "--no-progress", *map(str, args)])


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory, tiny_zh_model):
    """24 steps of 4 rows of 32 tokens from a stream of 54 training documents (about 2.4 passes), windows
    of 7 rows, a checkpoint every 6 steps."""
    tmp = tmp_path_factory.mktemp("stream")
    r = recipe(tmp, tiny_zh_model, "ref")
    assert train(r) == 0
    return tmp, tmp / "ref"


def test_streaming_training_runs_lowers_the_loss_and_caches_nothing(ref_run):
    tmp, run = ref_run
    ev = json.loads((run / "eval.json").read_text())
    assert ev["steps"] == 24
    assert ev["validation"]["loss"] < ev["validation_at_start"]["loss"] - 1.0, ev
    train_losses = [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                    if m["split"] == "train"]
    assert train_losses[-1] < train_losses[0]
    data = json.loads((run / "data.json").read_text())
    assert data["streaming"] and data["validation_documents"] == 6
    st = data["stream"]
    assert st["rows"] == 24 * 4 and st["passes"] >= 2  # past the source's end: a new pass began
    assert st["documents_per_pass"] == 60 - 6  # the validation documents are held out of every pass
    assert st["documents"] >= 54 and st["position"]["batch"] == 24
    assert not (tmp / "cache").exists()  # nothing written to the corpus cache


def test_resume_goes_on_at_the_saved_position_bit_identically(ref_run, tiny_zh_model):
    """The checkpoint of step 12 (mid-window, in the stream's second pass) in a fresh run folder, as a
    kill leaves it: --resume ends with the uninterrupted run's exact weights and validation losses."""
    tmp, ref = ref_run
    state = json.loads((ref / "checkpoints" / "step-12" / "state.json").read_text())["stream"]
    assert 0 < state["taken"] < 7 and state["at"]["pass"] == 1 and state["at"]["offset"] > 0, state
    part = tmp / "part"
    shutil.copytree(ref / "checkpoints" / "step-12", part / "checkpoints" / "step-12")
    assert train(recipe(tmp, tiny_zh_model, "part"), "--resume") == 0
    a, b = load_file(str(ref / "model" / "model.safetensors")), load_file(str(part / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    val = lambda run: [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                       if m["split"] == "validation"]
    assert val(ref) == val(part)
    assert json.loads((part / "data.json").read_text())["stream"]["position"] == \
        json.loads((ref / "data.json").read_text())["stream"]["position"]


def test_streaming_errors_are_one_line(tmp_path, run_cli, tiny_zh_model):
    r = recipe(tmp_path, tiny_zh_model, "r")
    code, _, err = run_cli("train", r, "--no-progress", "--set", "train.max_steps=null")
    assert code == 2 and err.strip().splitlines() == [
        "gpt2tune: error: data.streaming needs train.max_steps: a stream has no known length, so no epochs"], err
    code, _, err = run_cli("train", r, "--no-progress", "--set", "model.tokenizer=from-data", "--set", "model.init=scratch")
    assert code == 2 and "from-data" in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "d.csv").write_text("text\nabc\n", encoding="utf-8")
    code, _, err = run_cli("train", r, "--no-progress", "--set", f"data.source=csv:{tmp_path / 'd.csv'}")
    assert code == 2 and "reads hf:, jsonl: and text: sources" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli("data", "prepare", r)
    assert code == 2 and "data.streaming" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli("train", r, "--no-progress", "--set", "task=chat")
    assert code == 2 and "data.streaming is for task causal-lm" in err, err


def test_hf_source_of_a_local_dataset_folder_with_its_validation_split(tmp_path, run_cli, tiny_zh_model):
    """hf:FOLDER streams a local dataset (datasets' folder loader: data/train-*.jsonl, data/test-*.jsonl);
    validation from hf:FOLDER:test; a field other than text."""
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    write_jsonl(folder / "data" / "train-00000-of-00002.jsonl", documents(30), field="body")
    write_jsonl(folder / "data" / "train-00001-of-00002.jsonl", documents(60)[30:], field="body")
    write_jsonl(folder / "data" / "test-00000-of-00001.jsonl", documents(70)[60:], field="body")
    r = recipe(tmp_path, tiny_zh_model, "hf", steps=3, src=f"hf:{folder}",
               extra=f', validation: "hf:{folder}:test", field: body, val_documents: 4')
    code, _, err = run_cli("train", r, "--no-progress")
    assert code == 0, err
    assert "validation: the first 4 documents of hf:" in err
    data = json.loads((tmp_path / "hf" / "data.json").read_text())
    assert data["validation_from"] == "data.validation" and data["stream"]["rows"] == 12


def test_data_inspect_streaming_reads_the_first_records_only(tmp_path, run_cli, zh_tokenizer_dir):
    src = write_jsonl(tmp_path / "d.jsonl", documents(50))
    code, out, err = run_cli("data", "inspect", f"jsonl:{src}", "--streaming", "5", "--tokenizer", zh_tokenizer_dir,
                             "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["samples"] == 5 and report["examples"] == documents(3)
    assert report["notes"] == ["the first 5 records of the stream (--streaming)"]


# --------------------------------------------------------------------------- the stream itself


def _stream_parts(zh_tokenizer_dir):
    from gpt2tune.model.tokenizer import framing_of, load_tokenizer

    tok = load_tokenizer(zh_tokenizer_dir)
    return tok, framing_of(tok)


def _make(st, tok, fr, seed=7):
    from gpt2tune.data.stream import RowStream, read_validation

    _, start, _ = read_validation(st, tok, fr.bos, fr.eos)
    return RowStream(st, tok, fr.bos, fr.eos, start=start, seed=seed, log=lambda m: None)


def _rows(stream, n):
    return [(tuple(r), tuple(r.starts)) for r in (stream.next_row() for _ in range(n))]


def test_rows_are_the_documents_end_to_end_after_the_held_out_ones(tmp_path, zh_tokenizer_dir):
    """Unshuffled (windows of one row), the rows are the framed training documents laid end to end in
    the source's order, cut every max_length tokens, each row's starts where its documents begin; the
    stream goes on with the next pass; windows of 5 rows hold the same rows in another order."""
    from gpt2tune.data.dataset import tokenize_texts
    from gpt2tune.data.stream import StreamSettings

    tok, fr = _stream_parts(zh_tokenizer_dir)
    texts = documents(20)
    src = write_jsonl(tmp_path / "d.jsonl", texts)
    st = StreamSettings(f"jsonl:{src}", max_length=16, shuffle_buffer=1, val_documents=3)
    rows = _rows(_make(st, tok, fr), 40)
    framed, _ = tokenize_texts(tok, texts[3:], fr.bos, fr.eos, 16)
    flat = [t for d in framed for t in d]
    begins = set(__import__("itertools").accumulate(len(d) for d in framed[:-1]))
    assert 40 * 16 > len(flat)  # more than a pass
    expect = (flat * 3)[: 40 * 16]
    assert [t for ids, _ in rows for t in ids] == expect
    for k, (ids, starts) in enumerate(rows):
        assert len(ids) == 16
        if k * 16 < len(flat) - 16:  # first pass: starts at document boundaries (and 0)
            assert set(starts) == {0} | {b - k * 16 for b in begins if k * 16 < b < (k + 1) * 16}
    st5 = StreamSettings(f"jsonl:{src}", max_length=16, shuffle_buffer=5, val_documents=3)
    shuffled = _rows(_make(st5, tok, fr), 40)
    assert shuffled != rows
    assert all(sorted(shuffled[w : w + 5]) == sorted(rows[w : w + 5]) for w in range(0, 40, 5))


@pytest.mark.parametrize("kind,dedupe,limit,long_samples", [("jsonl", False, None, "truncate"),
                                                            ("jsonl", True, None, "split"),
                                                            ("text", True, 15, "truncate")])
def test_a_stream_restored_at_any_saved_position_gives_the_same_rows(tmp_path, zh_tokenizer_dir, kind, dedupe,
                                                                     limit, long_samples):
    """Rows read straight equal rows read up to a cut, saved (through JSON), restored into a new stream,
    read further, saved and restored again: at cuts inside and at the ends of windows, across passes,
    with per-window dedupe, a pass `limit` and long documents split."""
    from gpt2tune.data.stream import StreamSettings

    tok, fr = _stream_parts(zh_tokenizer_dir)
    texts = documents(24)
    texts = [t for i, t in enumerate(texts) for t in ([t, t] if i % 4 == 0 else [t])]  # neighbours repeat
    texts[5] = "".join(ZH_TEXT)  # a long one (split, or truncated)
    if kind == "jsonl":
        src = write_jsonl(tmp_path / "d.jsonl", texts)
    else:
        src = tmp_path / "d.txt"
        src.write_text("\n".join(texts) + "\n\n", encoding="utf-8")  # (a blank line is no sample)
    st = StreamSettings(f"{kind}:{src}", max_length=16, shuffle_buffer=5, val_documents=3, dedupe=dedupe, limit=limit,
                        long_samples=long_samples)
    n = 70
    s = _make(st, tok, fr)
    straight = _rows(s, n)
    assert s.stats["passes"] >= 2 and (s.stats["duplicates"] > 0) == dedupe
    for cut in [0, 1, 4, 5, 6, 13, 25, 33, 50, 69]:
        a = _make(st, tok, fr)
        got = _rows(a, cut)
        b = _make(st, tok, fr)
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        mid = cut + (n - cut) // 2
        got += _rows(b, mid - cut)
        c = _make(st, tok, fr)
        c.load_state_dict(json.loads(json.dumps(b.state_dict())))
        got += _rows(c, n - mid)
        assert got == straight, cut
    other = StreamSettings(**{**st.__dict__, "shuffle_buffer": 6})
    with pytest.raises(Exception, match="other data settings"):
        _make(other, tok, fr).load_state_dict(s.state_dict())


def test_the_stream_never_holds_the_source(monkeypatch, zh_tokenizer_dir):
    """A source of ten million documents made by a generator (it fails past 5,000 pulls): a few batches,
    and a resume, pull what a window needs plus one tokenizing chunk, and the window holds its rows only."""
    import datasets

    from gpt2tune.data import stream

    pulled = [0]

    def gen():
        for i in range(10**7):
            pulled[0] += 1
            assert pulled[0] < 5000, "the source is being read whole"
            yield {"text": ZH_TEXT[i % 4][: 5 + i % 19]}

    monkeypatch.setattr(stream, "open_source", lambda spec, mode="auto": datasets.IterableDataset.from_generator(gen))
    tok, fr = _stream_parts(zh_tokenizer_dir)
    st = stream.StreamSettings("jsonl:big.jsonl", max_length=32, shuffle_buffer=16, val_documents=4)
    s = _make(st, tok, fr)
    batches = s.epoch_batches(4, 7, 0)
    got = [batches[k] for k in range(6)]  # 24 rows: two windows
    assert pulled[0] <= 4 + 3 * stream.CHUNK, pulled
    assert s._win[0].nbytes == 16 * 32 * 4  # the window: rows x max_length x uint32
    state = json.loads(json.dumps(s.state_dict()))
    more = [batches[k] for k in range(6, 8)]
    pulled[0] = 0
    t = _make(st, tok, fr)
    t.load_state_dict(state)
    again = t.epoch_batches(4, 7, 0)
    assert [again[k] for k in range(6, 8)] == more
    assert pulled[0] <= 2 * (4 + 3 * stream.CHUNK), pulled
    assert len(got) == 6 and all(len(r) == 32 for b in got for r in b)


def test_hf_source_streams_from_the_hub_without_downloading_it(tmp_path, tiny_zh_model):
    """hf:ORG/NAME through the real huggingface_hub / datasets clients against a local hub: the data file
    is read over HTTP as training goes, never stored in HF_HOME."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from localhub import LocalHub

    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in documents(60)).encode()
    r = recipe(tmp_path, tiny_zh_model, "hub", steps=3, src="hf:org/docs")
    with LocalHub() as hub:
        hub.add_repo("org/docs", {"data/train-00000-of-00001.jsonl": data, "README.md": b"# docs\n"},
                     repo_type="dataset")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HUGGINGFACE_"))}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
                   PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        p = subprocess.run([sys.executable, "-m", "gpt2tune", "train", str(r), "--no-progress"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert any(path.endswith("/data/train-00000-of-00001.jsonl") for _, path in hub.requests)
    assert json.loads((tmp_path / "hub" / "data.json").read_text())["stream"]["rows"] == 12
    stored = [f for f in (tmp_path / "hf").rglob("*") if f.is_file() and f.stat().st_size >= len(data)]
    assert not stored, stored
