"""`train.early_stopping` and `train.keep_best`: a run on a tiny overfitting corpus stops when the
validation metric stops improving, RUN/model is the best evaluation's model (RUN/last the last),
and `--resume` continues the patience count."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from gpt2tune.errors import UserError
from gpt2tune.train.best import Watch, resolve_mode


def test_watch_counts_patience_with_min_delta():
    w = Watch("loss", "min", min_delta=0.1, patience=2)
    assert w.update({"loss": 3.0}, 5) and w.best_step == 5
    assert not w.update({"loss": 2.95}, 10)  # better, but by less than min_delta
    assert w.bad == 1 and not w.exhausted
    assert w.update({"loss": 2.8}, 15) and w.bad == 0 and w.best == 2.8
    assert not w.update({"loss": 2.9}, 20) and not w.update({"loss": 2.85}, 25)
    assert w.exhausted and w.best_step == 15
    up = Watch("macro_f1", resolve_mode("macro_f1", "auto"), patience=1)
    assert up.update({"macro_f1": 0.5}, 1) and up.update({"macro_f1": 0.6}, 2) and not up.update({"macro_f1": 0.6}, 3)
    assert up.exhausted
    with pytest.raises(UserError, match="evaluates loss, accuracy"):
        Watch("macro_f1", "max").update({"loss": 1.0, "accuracy": 0.5, "tokens": 3}, 1)
    with pytest.raises(UserError, match="set min or max"):
        resolve_mode("bleu", "auto")
    v = Watch("loss", "min", patience=3)
    v.load(w.state())
    assert (v.best, v.best_step, v.bad) == (2.8, 15, 2)


def _data():
    """Random token rows: the model memorises the 16 training rows, and the validation loss on
    other random rows first falls (token frequencies) and then rises (overfitting)."""
    r = random.Random(0)
    rows = [[1] + [r.randrange(3, 40) for _ in range(12)] + [2] for _ in range(32)]
    return rows[:16], rows[16:]


def _trainer(run_dir, loggers=(), **kw):
    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import Framing
    from gpt2tune.recipe import TrainSection
    from gpt2tune.train.loop import Data, Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    model = build_scratch("nano", 40, Framing(1, 2, 0, True), n_positions=24, seed=0)
    train, val = _data()
    cfg = TrainSection(**{**dict(precision="fp32", max_steps=300, batch_size=8, lr=3e-3, schedule="constant",
                                 num_threads=1, log_every=5, eval_every=5, seed=0,
                                 early_stopping={"patience": 3}, keep_best=True), **kw})
    return Trainer(model, Data(train, val, 0), cfg, run_dir, progress=False, log=lambda m: None, loggers=loggers)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_early_stopping_stops_and_the_best_model_is_restored(tmp_path):
    t = _trainer(tmp_path)
    res = t.fit()
    assert res.stopped_early and res.steps < 300
    val = [r for r in res.records if r["split"] == "validation" and r["step"] > 0]
    losses = [r["loss"] for r in val]
    best = val[losses.index(min(losses))]
    assert res.best["step"] == best["step"] < res.steps and res.best["value"] == best["loss"]
    assert [r["step"] for r in val][-4] == best["step"]  # three evaluations without improvement, then the stop
    last = _trainable(t.model)
    snaps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert snaps == [f"best-step-{best['step']}"]  # older bests pruned
    assert t.restore_best(t.model) == best["step"]
    saved = load_file(str(tmp_path / "checkpoints" / snaps[0] / "model.safetensors"))
    now = _trainable(t.model)
    assert saved.keys() == now.keys() and all(torch.equal(saved[n], now[n]) for n in now)
    assert any(not torch.equal(last[n], now[n]) for n in now)  # the best is not the last model


def test_resume_continues_the_patience_count(tmp_path):
    ref = _trainer(tmp_path / "ref").fit()
    # interrupt right after the first evaluation that did not improve: one of three patience used
    val = [(r["step"], r["loss"]) for r in ref.records if r["split"] == "validation" and r["step"] > 0]
    first_bad = next(s for i, (s, v) in enumerate(val) if i and v >= min(x for _, x in val[:i]))
    assert first_bad < ref.steps
    holder = {}
    from gpt2tune.train.loggers import Logger

    class Interrupt(Logger):  # Ctrl-C right after that evaluation
        def log(self, step, split, metrics):
            if split == "validation" and step == first_bad:
                holder["t"]._stop_signal = "SIGINT"

    from gpt2tune.train.loop import TrainingInterrupted

    t = holder["t"] = _trainer(tmp_path / "run", [Interrupt()], save_every=1000)
    with pytest.raises(TrainingInterrupted):
        t.fit()
    again = _trainer(tmp_path / "run")
    res = again.fit(resume=True)
    assert res.steps == ref.steps and res.best == ref.best and res.stopped_early
    ref_model = _trainer(tmp_path / "ref2")
    ref_model.fit()
    a, b = _trainable(again.model), _trainable(ref_model.model)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_needs_evaluations(tmp_path):
    with pytest.raises(UserError, match="train.eval_every"):
        _trainer(tmp_path, eval_every=0).fit()


def test_keep_best_run_folder(tmp_path, run_cli):
    from conftest import write_recipe

    train, val = _data()
    words = [chr(0x4E00 + 37 * t) for t in range(40)]  # one CJK character per token id
    (tmp_path / "train.txt").write_text("\n".join("".join(words[t] for t in row[1:-1]) for row in train), "utf-8")
    (tmp_path / "val.txt").write_text("\n".join("".join(words[t] for t in row[1:-1]) for row in val), "utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", f"""
task: causal-lm
model: {{init: scratch, size: nano, tokenizer: from-data}}
data: {{source: "text:{tmp_path / 'train.txt'}", validation: "text:{tmp_path / 'val.txt'}", max_length: 24}}
train: {{max_steps: 300, batch_size: 8, lr: 3.0e-3, schedule: constant, precision: fp32, num_threads: 1,
         eval_every: 5, early_stopping: {{patience: 3}}, keep_best: true}}
sample: {{prompts: []}}
output: {{dir: "{tmp_path / 'run'}"}}
""")
    code, _, err = run_cli("train", recipe)
    assert code == 0, err
    run = tmp_path / "run"
    ev = json.loads((run / "eval.json").read_text())
    assert ev["stopped_early"] and ev["steps"] < 300 and ev["best"]["step"] < ev["last"]["step"] == ev["steps"]
    assert ev["validation"] == ev["best"]["validation"] and ev["last"]["validation"]["loss"] > ev["validation"]["loss"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert min(r["loss"] for r in rows if r["split"] == "validation" and r["step"] > 0) == ev["best"]["value"]
    best = load_file(str(run / "checkpoints" / f"best-step-{ev['best']['step']}" / "model.safetensors"))
    model = load_file(str(run / "model" / "model.safetensors"))
    last = load_file(str(run / "last" / "model" / "model.safetensors"))
    shared = [n for n in best if n in model]
    assert len(shared) >= len(model) - 1  # every saved tensor (lm_head is tied to wte)
    assert all(torch.equal(best[n], model[n]) for n in shared)
    assert any(not torch.equal(last[n], model[n]) for n in shared)
    assert "keep_best: model holds the best model" in err
