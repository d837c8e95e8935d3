import json
import math
import shutil

import pytest
import torch

from conftest import POEMS, TANG_MINI, ZH_TEXT, need, write_recipe
from gpt2tune.data.dataset import collate
from gpt2tune.train.objective import lm_loss

RECIPE = """
task: causal-lm
model: {{init: scratch, size: nano, tokenizer: from-data}}
data: {{source: "text:{src}", val_fraction: 0.2, max_length: 40}}
train: {{precision: fp32, lr: 3.0e-3, batch_size: 4, max_steps: {steps}, eval_every: 10, save_every: 10,
         log_every: 5, seed: 7, warmup_steps: 2}}
sample: {{prompts: ["白日"], max_new_tokens: 20}}
output: {{dir: "{out}"}}
"""


def make_run(tmp_path, run_cli, name="run", steps=30, extra=()):
    src = tmp_path / "poems.txt"
    if not src.exists():
        src.write_text("\n".join(ZH_TEXT * 10), encoding="utf-8")
    out = tmp_path / name
    r = write_recipe(tmp_path / f"{name}.yaml", RECIPE.format(src=src, out=out, steps=steps))
    code, stdout, err = run_cli("train", r, "--no-progress", *extra)
    assert code == 0, err
    return out, r, err


def test_train_writes_a_complete_run_folder(tmp_path, run_cli):
    out, recipe, err = make_run(tmp_path, run_cli)
    for f in ["recipe.yaml", "metrics.jsonl", "eval.json", "data.json", "samples.json", "plots/loss.png",
              "plots/accuracy.png", "model/config.json", "model/model.safetensors", "model/tokenizer_config.json"]:
        assert (out / f).is_file(), f
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-20", "step-30"]  # keep 2
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    val = [r for r in recs if r["split"] == "validation"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in val] == [0, 10, 20, 30]
    assert all(r["tokens_per_s"] > 0 and 0 <= r["accuracy"] <= 1 for r in train)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["validation"]["loss"] < ev["validation_at_start"]["loss"] - 0.5
    assert math.isclose(ev["validation"]["perplexity"], math.exp(ev["validation"]["loss"]), rel_tol=1e-6)
    sample = json.loads((out / "samples.json").read_text())[0]["text"]
    assert sample.startswith("白日") and " " not in sample and "[" not in sample

    # a finished run is never overwritten silently
    code, _, err = run_cli("train", recipe)
    assert code == 2 and "already holds a finished run" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1


def test_run_model_loads_in_plain_transformers_with_same_logits(tmp_path, run_cli):
    out, _, _ = make_run(tmp_path, run_cli, steps=10)
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from gpt2tune.method.io import load_run as load_for_inference

    ours, tok, fr = load_for_inference(out)
    plain = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    plain_tok = AutoTokenizer.from_pretrained(str(out / "model"))
    ids = plain_tok("白日依山", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == fr.bos
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, plain(ids).logits)
    pipe = pipeline("text-generation", model=str(out / "model"))
    res = pipe("白日", max_new_tokens=5, do_sample=False)
    assert isinstance(res[0]["generated_text"], str)
    assert plain.generation_config.eos_token_id == fr.eos


def test_padding_never_counts_in_the_loss():
    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import Framing

    model = build_scratch("nano", 50, Framing(1, 2, 0, True), n_positions=32, dropout=0.0).eval()
    rows = [[1, 5, 6, 7, 8, 2], [1, 9, 2]]
    padded = collate(rows, pad_id=0)
    loss, n, _ = lm_loss(model, padded)
    assert n == 5 + 2
    total = 0.0
    for r in rows:
        l, k, _ = lm_loss(model, collate([r], pad_id=0))
        total += float(l.detach()) * k
    assert float(loss) == pytest.approx(total / n, abs=1e-5)
    # and it equals transformers' own loss on the same batch
    with torch.no_grad():
        hf = model(**padded).loss
    assert float(loss) == pytest.approx(float(hf), abs=1e-5)


def test_resume_from_checkpoint_is_bit_identical(tmp_path, run_cli):
    from safetensors.torch import load_file

    full, _, _ = make_run(tmp_path, run_cli, name="full", steps=30)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoints" / "step-20", part / "checkpoints" / "step-20")
    shutil.copytree(full / "tokenizer", part / "tokenizer")
    src = tmp_path / "poems.txt"
    r = write_recipe(tmp_path / "part.yaml", RECIPE.format(src=src, out=part, steps=30))
    code, _, err = run_cli("train", r, "--resume", "--no-progress")
    assert code == 0, err
    assert "resumed from" in err
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(part / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = [l for l in (full / "metrics.jsonl").read_text().splitlines() if '"validation"' in l]
    mb = [l for l in (part / "metrics.jsonl").read_text().splitlines() if '"validation"' in l]
    assert [json.loads(x)["loss"] for x in ma] == [json.loads(x)["loss"] for x in mb]


def test_nano_on_real_tang_poems_lowers_perplexity(tmp_path, run_cli):
    need(POEMS)
    r = write_recipe(tmp_path / "r.yaml", f"""
task: causal-lm
model: {{init: scratch, size: nano, tokenizer: from-data}}
data: {{source: "chinese-poetry:{POEMS}/poet.tang.0.json", val_fraction: 0.1, max_length: 96}}
train: {{lr: 3.0e-3, batch_size: 16, max_steps: 250, log_every: 50, seed: 1, warmup_steps: 20}}
output: {{dir: "{tmp_path / 'run'}"}}
""")
    code, _, err = run_cli("train", r, "--no-progress")
    assert code == 0, err
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    start, end = ev["validation_at_start"]["perplexity"], ev["validation"]["perplexity"]
    assert end < start / 5, (start, end)


def test_tang_mini_fine_tunes_and_generates(tmp_path, run_cli):
    need(TANG_MINI)
    need(POEMS)
    r = write_recipe(tmp_path / "r.yaml", f"""
task: causal-lm
model: {{name: "{TANG_MINI}"}}
data: {{source: "chinese-poetry:{POEMS}/poet.tang.1000.json", val_fraction: 0.05, max_length: 96, limit: 200}}
train: {{lr: 2.0e-5, batch_size: 8, max_steps: 8, seed: 1}}
output: {{dir: "{tmp_path / 'run'}"}}
""")
    code, _, err = run_cli("train", r, "--no-progress")
    assert code == 0, err
    code, out, err2 = run_cli("generate", tmp_path / "run", "--prompt", "白日", "-n", "3", "--seed", "3",
                              "--max-new-tokens", "120", "--json")
    assert code == 0, err2
    samples = json.loads(out)
    assert len(samples) == 3
    for s in samples:
        t = s["text"]
        assert t.startswith("白日") and " " not in t
        assert not any(x in t for x in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"))
    assert "50256" not in err + err2


def test_samples_can_use_int8_decoding_weights(tmp_path, run_cli):
    out, _, _ = make_run(tmp_path, run_cli, steps=10, extra=("--set", "sample.weights=int8"))
    import yaml

    assert yaml.safe_load((out / "recipe.yaml").read_text())["sample"]["weights"] == "int8"
    sample = json.loads((out / "samples.json").read_text())[0]["text"]
    assert sample.startswith("白日") and len(sample) > 2
    code, _, err = run_cli("train", tmp_path / "run.yaml", "--set", "sample.weights=int4", "--overwrite")
    assert code == 2 and "sample.weights" in err
