"""train.report_to: a tiny real training logs to TensorBoard, MLflow and W&B (offline), and what the tools
wrote is read back with their own readers and compared with metrics.jsonl."""

import glob
import importlib.util
import json
import struct

import pytest

from conftest import ZH_TEXT, write_recipe

RECIPE = """
task: causal-lm
model: {{init: scratch, size: nano, tokenizer: from-data}}
data: {{source: "text:{src}", val_fraction: 0.2, max_length: 40}}
train: {{precision: fp32, lr: 3.0e-3, batch_size: 4, max_steps: 12, log_every: 4, eval_every: 6, seed: 7,
         num_threads: 1, report_to: [{trackers}]}}
output: {{dir: "{out}"}}
"""
INSTALLED = [n for n, m in (("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb"))
             if importlib.util.find_spec(m) is not None]


def isolate(mp, tmp):
    """Trackers write only under tmp: no user configuration, no network."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT",
                "TRACKIO_DIR"):
        mp.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        mp.setenv(var, str(tmp / "wandb-home"))
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the local file store back


def make_recipe(tmp, trackers, name="run"):
    src = tmp / "poems.txt"
    src.write_text("\n".join(ZH_TEXT * 10), encoding="utf-8")
    return write_recipe(tmp / f"{name}.yaml", RECIPE.format(src=src, trackers=", ".join(trackers), out=tmp / name))


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected(run, split, key):
    return [(r["step"], r[key]) for r in metrics(run) if r["split"] == split]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One training that reports to every installed tracker."""
    from gpt2tune.cli import main

    if not INSTALLED:
        pytest.skip("none of tensorboard, mlflow, wandb is installed (pip install 'gpt2tune[tensorboard,mlflow,wandb]')")
    tmp = tmp_path_factory.mktemp("tracking")
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, tmp)
        assert main(["train", str(make_recipe(tmp, INSTALLED)), "--no-progress"]) == 0
    run = tmp / "run"
    assert len(expected(run, "train", "loss")) == 3 and len(expected(run, "validation", "loss")) == 3
    return run


def same(got, want, rel=1e-6):
    """Equal steps, values equal up to float32 rounding (TensorBoard stores float32)."""
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=rel, abs=1e-12)


def need(name):
    if name not in INSTALLED:
        pytest.skip(f"{name} is not installed (pip install 'gpt2tune[{name}]')")


# -- TensorBoard ------------------------------------------------------------------------------


def test_tensorboard_event_file_holds_the_logged_scalars(run):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    for split, key in (("train", "loss"), ("train", "lr"), ("validation", "loss"), ("validation", "perplexity")):
        got = [(e.step, e.value) for e in ea.Scalars(f"{split}/{key}")]
        want = expected(run, split, key)
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=1e-12)  # float32 events
    assert {"plots/loss", "plots/accuracy"} <= set(tags["images"])  # RUN/plots/*.png
    hparams = ea.PluginTagToContent("hparams")  # the HParams dashboard's session: the recipe's fields
    assert hparams and any(b"train.lr" in v for v in hparams.values())
    assert "recipe/text_summary" in tags["tensors"]


# -- MLflow -----------------------------------------------------------------------------------


def mlflow_runs(run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("gpt2tune")
    return client, client.search_runs([exp.experiment_id])


def test_mlflow_local_store_holds_the_logged_metrics_params_and_plots(run, monkeypatch):
    need("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client, runs = mlflow_runs(run)
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED" and r.info.run_name == "run"
    for split, key in (("train", "loss"), ("train", "lr"), ("validation", "loss"), ("validation", "perplexity")):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, f"{split}/{key}"))
        want = expected(run, split, key)
        assert [s for s, _ in hist] == [s for s, _ in want]
        assert [v for _, v in hist] == pytest.approx([v for _, v in want], rel=1e-12)
    params = r.data.params
    assert float(params["train.lr"]) == 3e-3 and params["train.max_steps"] == "12" and params["task"] == "causal-lm"
    assert json.loads(params["train.report_to"]) == INSTALLED
    plots = {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
    assert plots == {"plots/loss.png", "plots/accuracy.png"}
    assert "recipe.yaml" in {a.path for a in client.list_artifacts(r.info.run_id)}


# -- Weights & Biases (offline) -----------------------------------------------------------------


def wandb_records(path):
    """The records of a W&B run file (.wandb): a LevelDB-style log (32 KiB blocks of chunks) of
    `wandb_internal_pb2.Record` messages after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, "not a W&B run file"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def wandb_run(run):
    files = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    history, config, exits, saved = [], {}, [], []
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item})
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in rec.run.config.update}
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "exit":
            exits.append(rec.exit.exit_code)
        elif kind == "files":
            saved += [f.path for f in rec.files.files]
    return history, config, exits, saved


def test_wandb_offline_run_holds_the_logged_metrics_config_and_plots(run):
    need("wandb")
    history, config, exits, saved = wandb_run(run)
    for split, key in (("train", "loss"), ("train", "lr"), ("validation", "loss"), ("validation", "perplexity")):
        got = [(h["step"], h[f"{split}/{key}"]) for h in history if f"{split}/{key}" in h]
        want = expected(run, split, key)
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-12)
    assert config["train"]["lr"] == 3e-3 and config["task"] == "causal-lm"  # the resolved recipe
    assert exits == [0]
    assert "recipe.yaml" in saved  # the plots as images:
    assert {"plots/loss", "plots/accuracy"} <= {k.rsplit("/", 1)[0] for h in history for k in h if k.endswith("/_type")
                                                and h[k] == "image-file"}
    assert sum(p.startswith("media/images/plots/") for p in saved) == 2


# -- closing on errors, missing packages --------------------------------------------------------


@pytest.mark.parametrize("error, status, exit_code", [(RuntimeError, "FAILED", 1), (KeyboardInterrupt, "KILLED", 130)])
def test_a_failing_run_closes_its_trackers_as_failed(tmp_path, monkeypatch, error, status, exit_code):
    """An error (or Ctrl-C) after the first rows were logged: the MLflow run ends FAILED (KILLED), W&B's
    with exit code 1 (130)."""
    from gpt2tune.cli import main

    tools = [n for n in ("mlflow", "wandb") if n in INSTALLED]
    if not tools:
        pytest.skip("neither mlflow nor wandb is installed")
    isolate(monkeypatch, tmp_path)

    def boom(records, out_dir):  # the loop's last act: every row has been logged by then
        raise error("disk on fire")

    monkeypatch.setattr("gpt2tune.train.loop.plot_training", boom)
    if error is KeyboardInterrupt:
        assert main(["train", str(make_recipe(tmp_path, tools)), "--no-progress"]) == 130
    else:
        with pytest.raises(error, match="disk on fire"):
            main(["train", str(make_recipe(tmp_path, tools)), "--no-progress"])
    run = tmp_path / "run"
    assert len(metrics(run)) == 6
    if "mlflow" in tools:
        client, runs = mlflow_runs(run)
        assert [r.info.status for r in runs] == [status]
        assert len(client.get_metric_history(runs[0].info.run_id, "train/loss")) == 3
    if "wandb" in tools:
        history, _, exits, _ = wandb_run(run)
        assert exits == [exit_code] and sum("train/loss" in h for h in history) == 3


def test_resume_goes_on_in_the_same_mlflow_and_wandb_runs(tmp_path, monkeypatch):
    """--resume from the last checkpoint: its rows land in the run the first process started."""
    from gpt2tune.cli import main

    tools = [n for n in ("mlflow", "wandb") if n in INSTALLED]
    if not tools:
        pytest.skip("neither mlflow nor wandb is installed")
    isolate(monkeypatch, tmp_path)
    recipe = make_recipe(tmp_path, tools)
    assert main(["train", str(recipe), "--no-progress", "--set", "train.save_every=12"]) == 0
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--no-progress", "--set", "train.save_every=12", "--resume"]) == 0
    assert [(r["step"], r["split"]) for r in metrics(run)][-2:] == [(12, "train"), (12, "validation")]  # evaluated again
    if "mlflow" in tools:
        client, runs = mlflow_runs(run)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        hist = client.get_metric_history(runs[0].info.run_id, "validation/loss")
        assert sorted(m.step for m in hist) == [0, 6, 12, 12]
    if "wandb" in tools:
        files = sorted(glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb")))
        assert len(files) == 2 and len({f.rsplit("run-", 1)[1] for f in files}) == 1  # one W&B run id, twice


def test_missing_tracker_package_is_a_one_line_error_naming_the_extra(tmp_path, monkeypatch, run_cli):
    isolate(monkeypatch, tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code, _, err = run_cli("train", make_recipe(tmp_path, ["wandb"]), "--no-progress")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line == "gpt2tune: error: train.report_to: wandb needs the package wandb: pip install 'gpt2tune[wandb]'"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training


def test_report_to_names_are_validated(tmp_path, run_cli):
    code, _, err = run_cli("train", make_recipe(tmp_path, ["tensorbord"]), "--no-progress")
    assert code == 2 and "train.report_to" in err and "'tensorboard', 'mlflow', 'wandb' or 'trackio'" in err
    from gpt2tune.recipe import recipe_from_dict

    r = recipe_from_dict({"data": {"source": "text:x"}}, ["train.report_to=tensorboard,mlflow"])
    assert r.train.report_to == ["tensorboard", "mlflow"] and recipe_from_dict({"data": {"source": "text:x"}}).train.report_to == []


def test_scalar_names_and_flat_params():
    from gpt2tune.train.loggers import flat_params, scalar_names

    values = scalar_names("pretrain/validation", {"loss": 2.0, "perplexity": 7.39, "tokens": 200, "best": True})
    assert values == {"pretrain/validation/loss": 2.0, "pretrain/validation/perplexity": 7.39,
                                    "pretrain/validation/tokens": 200.0}
    assert flat_params({"train": {"lr": 1e-3, "betas": [0.9, 0.99], "max_steps": None}, "task": "chat"}) == {
        "train.lr": 1e-3, "train.betas": "[0.9, 0.99]", "train.max_steps": "null", "task": "chat"}


def test_trackio_logs_the_scalars(tmp_path, monkeypatch):
    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio is not installed (pip install 'gpt2tune[trackio]'; not in make install: "
                    "it needs pillow<13)")
    from gpt2tune.cli import main

    isolate(monkeypatch, tmp_path)
    assert main(["train", str(make_recipe(tmp_path, ["trackio"])), "--no-progress"]) == 0
    assert any((tmp_path / "run" / "trackio").rglob("*")), "nothing written under RUN/trackio"


def test_classification_logs_pretraining_training_and_its_late_plots(tmp_path, monkeypatch):
    """Classification: the language-model pretraining under pretrain/, the classifier's rows, and the
    confusion matrix drawn after training, in one TensorBoard run."""
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gpt2tune.cli import main

    isolate(monkeypatch, tmp_path)
    words = {"pos": ["good", "great", "nice", "fine"], "neg": ["bad", "awful", "poor", "sad"]}
    rows = [(lab, f"the film was {words[lab][i % 4]} and long") for i in range(60) for lab in ("pos", "neg")]
    (tmp_path / "s.tsv").write_text("".join(f"{lab}\t{text}\n" for lab, text in rows), encoding="utf-8")
    recipe = write_recipe(tmp_path / "c.yaml", f"""
task: classification
model: {{init: scratch, size: nano, tokenizer: from-data, vocab_size: 200, n_positions: 64}}
data: {{source: "tsv:{tmp_path / 's.tsv'}", columns: [label, text], max_length: 40}}
classification: {{split: [0.6, 0.2, 0.2], pretrain_steps: 4}}
train: {{precision: fp32, lr: 3.0e-3, batch_size: 8, max_steps: 6, log_every: 2, num_threads: 1,
         report_to: [tensorboard]}}
output: {{dir: "{tmp_path / 'clf'}"}}
""")
    assert main(["train", str(recipe), "--no-progress"]) == 0
    run = tmp_path / "clf"
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    pre = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    same([(e.step, e.value) for e in ea.Scalars("pretrain/train/loss")],
         [(r["step"], r["loss"]) for r in pre if r["split"] == "train"])
    same([(e.step, e.value) for e in ea.Scalars("train/loss")], expected(run, "train", "loss"))
    assert [e.step for e in ea.Scalars("validation/accuracy")] == [s for s, _ in expected(run, "validation", "accuracy")]
    assert "plots/confusion-matrix" in ea.Tags()["images"]  # drawn after training: the trackers close after it
