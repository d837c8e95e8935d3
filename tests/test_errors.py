"""Bad input gets a one-line error and exit code 2 (no traceback); pickles are never loaded."""

import json
import os
import pickle
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ZH_TEXT, write_recipe


def recipe_text(src, out, **over):
    train = {"max_steps": 2, "batch_size": 2, "precision": "fp32", **over.pop("train", {})}
    model = {"init": "scratch", "size": "nano", "tokenizer": "from-data", **over.pop("model", {})}
    data = {"source": src, "val_fraction": 0.2, "max_length": 32, **over.pop("data", {})}
    return json.dumps({"task": "causal-lm", "model": model, "data": data, "train": train,
                       "output": {"dir": str(out)}, **over})


def expect_error(run_cli, tmp_path, *args, match):
    code, out, err = run_cli(*args)
    assert code == 2, (code, err)
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    # the run's own log lines may come first (e.g. "data: tokenized into ..."); the error is one last line
    errors = [l for l in lines if l.startswith("gpt2tune: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert match in lines[-1], lines[-1]
    return lines[-1]


def train_with(tmp_path, run_cli, match, content=None, spec_kind="text", extra_args=(), **over):
    f = tmp_path / "data.txt"
    if content is not None:
        f.write_bytes(content)
    r = write_recipe(tmp_path / "r.yaml", recipe_text(f"{spec_kind}:{f}", tmp_path / "run", **over))
    return expect_error(run_cli, tmp_path, "train", r, "--no-progress", *extra_args, match=match)


@pytest.mark.parametrize("content,match", [
    (b"", "is empty"),
    (b"\n \n\t\n", "is empty"),
    ("好詩\n".encode() * 3 + b"\xc3\x28 broken\n", "data.txt:4: not valid UTF-8"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
])
def test_bad_text_files(tmp_path, run_cli, content, match):
    train_with(tmp_path, run_cli, match, content)


def test_csv_without_named_column(tmp_path, run_cli):
    train_with(tmp_path, run_cli, "no field/column 'body'; available: label, text",
               b"label,text\nham,hello\nspam,win\n", spec_kind="csv", data={"field": "body"})


def test_jsonl_broken_line(tmp_path, run_cli):
    train_with(tmp_path, run_cli, "data.txt:2: broken JSON", b'{"text": "a"}\n{"text": \n', spec_kind="jsonl")


def test_missing_model_folder(tmp_path, run_cli):
    train_with(tmp_path, run_cli, "model folder not found", "詩\n".encode() * 5,
               model={"init": "pretrained", "name": str(tmp_path / "no" / "such" / "model"), "tokenizer": None})


def test_hub_id_offline_not_cached(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    msg = train_with(tmp_path, run_cli, "not in the Hugging Face cache", "詩\n".encode() * 5,
                     model={"init": "pretrained", "name": "uer/gpt2-chinese-cluecorpussmall", "tokenizer": None})
    assert "run once with internet access" in msg


def test_tokenizer_larger_than_embeddings(tmp_path, run_cli, tiny_zh_model):
    from gpt2tune.model.tokenizer import build_tokenizer

    big = tmp_path / "bigtok"
    build_tokenizer(ZH_TEXT + ["".join(chr(0x4E00 + i) for i in range(3000))], big)
    train_with(tmp_path, run_cli, "embeddings only", "詩\n".encode() * 5,
               model={"init": "pretrained", "name": str(tiny_zh_model), "tokenizer": str(big)})


@pytest.mark.parametrize("over,match", [
    ({"train": {"lrr": 1}}, "unknown field 'train.lrr'"),
    ({"train": {"batch_size": "big"}}, "field 'train.batch_size'"),
    ({"train": {"lr": 0}}, "field 'train.lr'"),
    ({"train": {"lr": -0.1}}, "field 'train.lr'"),
    ({"train": {"batch_size": 0}}, "field 'train.batch_size'"),
])
def test_bad_recipe_values(tmp_path, run_cli, over, match):
    train_with(tmp_path, run_cli, match, "詩\n".encode() * 5, **over)


def test_set_on_unknown_field(tmp_path, run_cli):
    train_with(tmp_path, run_cli, "no field 'speed' in train", "詩\n".encode() * 5,
               extra_args=("--set", "train.speed=3"))


def test_unwritable_output(tmp_path, run_cli):
    (tmp_path / "afile").write_text("x")
    f = tmp_path / "data.txt"
    f.write_text("詩\n" * 5, encoding="utf-8")
    r = write_recipe(tmp_path / "r.yaml", recipe_text(f"text:{f}", tmp_path / "afile" / "run"))
    expect_error(run_cli, tmp_path, "train", r, match="not writable")


def test_long_samples_are_truncated_and_counted(tmp_path, run_cli):
    f = tmp_path / "data.txt"
    f.write_text("\n".join(ZH_TEXT * 3 + ["長" * 200]), encoding="utf-8")
    r = write_recipe(tmp_path / "r.yaml", recipe_text(f"text:{f}", tmp_path / "run", data={"val_fraction": 0.0}))
    code, _, err = run_cli("train", r, "--no-progress")
    assert code == 0, err
    assert "1 samples were longer than data.max_length=32" in err
    assert json.loads((tmp_path / "run" / "data.json").read_text())["truncated"] == 1


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_payloads_are_never_executed(tmp_path, run_cli):
    """Pickles planted where the loaders look (a checkpoint folder, a newer checkpoint folder, model
    folders next to or instead of the safetensors weights) are ignored or refused, never unpickled."""
    f = tmp_path / "data.txt"
    f.write_text("\n".join(ZH_TEXT * 5), encoding="utf-8")
    r = write_recipe(tmp_path / "r.yaml", recipe_text(f"text:{f}", tmp_path / "run",
                                                     train={"max_steps": 4, "save_every": 1, "keep_checkpoints": 10}))
    code, _, err = run_cli("train", r, "--no-progress")
    assert code == 0, err
    run = tmp_path / "run"
    marker = tmp_path / "PWNED"
    evil = pickle.dumps(_Payload(str(marker)))
    pickle.loads(evil)  # the payload works: unpickling it creates the marker
    assert marker.is_dir()
    marker.rmdir()
    clean_model = tmp_path / "clean-model"
    shutil.copytree(run / "model", clean_model)

    # 1) a run stopped after step 2, with pickles under the names other trainers use, in the checkpoint
    #    it resumes from and in a newer checkpoint folder without state.json: resumes from step 2
    cks = run / "checkpoints"
    for step in (3, 4):
        shutil.rmtree(cks / f"step-{step}")
    stray = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "pytorch_model.bin")
    for folder in (cks / "step-2", cks / "step-9", cks / "checkpoint-9"):
        folder.mkdir(exist_ok=True)
        for name in stray:
            (folder / name).write_bytes(evil)
    code, _, err = run_cli("train", r, "--resume", "--no-progress")
    assert code == 0, err
    assert f"resumed from {cks / 'step-2'} (step 2 of 4)" in err, err
    assert json.loads((run / "eval.json").read_text())["steps"] == 4
    assert not marker.exists()

    # 2) a model folder whose only weights are a malicious legacy .bin: refused (generate, and train
    #    from it as a pretrained base) with the one-line error, not executed
    legacy = tmp_path / "legacy"
    shutil.copytree(clean_model, legacy)
    (legacy / "model.safetensors").unlink()
    (legacy / "pytorch_model.bin").write_bytes(evil)
    refused = f"refused to load {legacy}: its legacy .bin weights hold more than tensors"
    expect_error(run_cli, tmp_path, "generate", legacy, "--prompt", "白", match=refused)
    assert not marker.exists()
    r2 = write_recipe(tmp_path / "r2.yaml", recipe_text(f"text:{f}", tmp_path / "run2", model={
        "init": "pretrained", "name": str(legacy), "tokenizer": None}))
    expect_error(run_cli, tmp_path, "train", r2, "--no-progress", match=refused)
    assert not marker.exists()

    # 3) next to safetensors weights the .bin is never opened: the model loads and generates
    both = tmp_path / "both"
    shutil.copytree(clean_model, both)
    (both / "pytorch_model.bin").write_bytes(evil)
    code, out, err = run_cli("generate", both, "--prompt", "白", "--max-new-tokens", "4")
    assert code == 0, err
    assert out.strip().startswith("白"), out
    assert not marker.exists()


# ---- property-based: parsers never crash with anything but a UserError ----

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_text_and_jsonl_readers_only_raise_user_errors(tmp_path, blob):
    from gpt2tune.data.sources import load_source
    from gpt2tune.errors import UserError

    p = tmp_path / "blob"
    p.write_bytes(blob)
    for kind in ("text", "jsonl", "csv", "tsv", "chinese-poetry"):
        try:
            loaded = load_source(f"{kind}:{p}")
        except UserError:
            continue
        assert isinstance(loaded.records, list)
        assert all(isinstance(r, dict) for r in loaded.records)


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.sampled_from(["task", "model", "data", "train", "x"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=5),
                                 st.dictionaries(st.sampled_from(["lr", "source", "size", "batch_size", "q"]),
                                                 st.one_of(st.integers(-2, 5), st.floats(allow_nan=True),
                                                           st.text(max_size=8)), max_size=3)), max_size=4),
       st.lists(st.from_regex(r"[a-z_.]{1,12}=[a-z0-9.]{0,5}", fullmatch=True), max_size=2))
def test_recipe_parser_only_raises_user_errors(raw, overrides):
    from gpt2tune.errors import UserError
    from gpt2tune.recipe import Recipe, recipe_from_dict

    try:
        r = recipe_from_dict(raw, overrides)
    except UserError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert isinstance(r, Recipe) and r.train.lr > 0 and r.train.batch_size >= 1


def test_a_corrupt_checkpoint_file_is_a_one_line_error(tmp_path):
    """A checkpoint tensor file that is not safetensors (truncated, or a pickle in its place) stops
    --resume with a one-line 'unreadable' error, not a traceback."""
    from gpt2tune.errors import UserError
    from gpt2tune.train.checkpoint import load_checkpoint

    ck = tmp_path / "step-1"
    ck.mkdir()
    (ck / "state.json").write_text("{}")
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        (ck / name).write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint(ck, None, None, None)
