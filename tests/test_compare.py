import csv
import json
import subprocess
import sys

import pytest

from conftest import ZH_TEXT, write_recipe

RECIPE = """
task: causal-lm
model: {{init: scratch, size: nano, tokenizer: from-data}}
data: {{source: "text:{src}", val_fraction: 0.2, max_length: 40}}
train: {{precision: fp32, lr: 3.0e-3, batch_size: 4, max_steps: 12, log_every: 4, seed: 7, save_every: 4}}
compare:
  methods: [{{name: adapter, bottleneck: 16}}]
  lr: {{lora: 1.0e-2, prompt-tuning: 3.0e-2, adapter: 1.0e-2}}
  reference: "text:{ref}"
output: {{dir: "{out}"}}
"""


def make_recipe(tmp_path):
    src, ref = tmp_path / "poems.txt", tmp_path / "other.txt"
    src.write_text("\n".join(ZH_TEXT[:3] * 12), encoding="utf-8")
    ref.write_text("\n".join(ZH_TEXT[3:] * 4), encoding="utf-8")
    return write_recipe(tmp_path / "c.yaml", RECIPE.format(src=src, ref=ref, out=tmp_path / "runs" / "c"))


def test_compare_writes_real_measurements(tmp_path, run_cli):
    r = make_recipe(tmp_path)
    out = tmp_path / "cmp"
    code, stdout, err = run_cli("compare", r, "--methods", "full,lora,prompt-tuning,adapter", "--output", out,
                                "--no-progress")
    assert code == 0, err
    for f in ("comparison.md", "comparison.csv", "comparison.json", "comparison.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 200, f
    data = json.loads((out / "comparison.json").read_text())
    rows = {r["method"]: r for r in data["methods"]}
    assert list(rows) == ["full", "lora", "prompt-tuning", "adapter"]
    assert data["settings"]["methods"]["adapter"]["bottleneck"] == 16  # compare.methods settings used
    # each method trained in its own run folder, with its own learning rate and the same budget
    for name, row in rows.items():
        run = json.loads((out / name / "eval.json").read_text())
        assert row["steps"] == run["steps"] == 12
        assert row["trainable"] == run["parameters"]["trainable"]
        assert not (out / name / "checkpoints").exists()  # no checkpoint inside the timed loop
    assert [rows[n]["lr"] for n in rows] == [3e-3, 1e-2, 3e-2, 1e-2]
    assert (out / "full" / "model").is_dir() and (out / "lora" / "adapter").is_dir()

    assert rows["full"]["trainable_percent"] == 100.0
    assert all(r["trainable_percent"] < 20 for n, r in rows.items() if n != "full")
    assert max(rows, key=lambda n: rows[n]["saved_mb"]) == "full"
    assert all(r["val_loss"] < r["val_loss_start"] for r in rows.values()), rows
    # a nano model's training adds little to the process's import-time peak, so equal peaks are possible
    # here; the peak itself must be a real reading (torch alone needs far more than 50 MB)
    assert all(r["peak_rss_mb"] > 50 for r in rows.values())
    assert all(r["seconds_per_step"] > 0 for r in rows.values())  # measured, never asserted to differ
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    # forgetting: one "before" (the base) for all, a measured "after" per method
    before = {r["ref_ppl_before"] for r in rows.values()}
    assert len(before) == 1 and before.pop() > 1
    assert all(r["ref_ppl_after"] > 1 and r["forgetting_percent"] is not None for r in rows.values())
    assert data["base"]["reference"]["tokens"] > 0

    with open(out / "comparison.csv", encoding="utf-8") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["method"] for r in csv_rows] == list(rows)
    assert float(csv_rows[0]["saved_mb"]) == pytest.approx(rows["full"]["saved_mb"])
    md = (out / "comparison.md").read_text()
    assert md.count("\n| ") == 1 + 4 and "forgetting" in md and "peak RSS" in md
    assert "| full |" in stdout

    code, _, err = run_cli("compare", r, "--methods", "full", "--output", out)
    assert code == 2 and "--overwrite" in err


def test_compare_rejects_bad_methods_before_training(tmp_path, run_cli):
    r = make_recipe(tmp_path)
    code, _, err = run_cli("compare", r, "--methods", "full,dora", "--output", tmp_path / "o")
    assert code == 2 and "unknown method 'dora'" in err
    code, _, err = run_cli("compare", r, "--methods", "lora,lora", "--output", tmp_path / "o")
    assert code == 2 and "twice" in err
    assert not (tmp_path / "o").exists()


def test_peak_rss_sees_a_large_allocation():
    code = ("import psutil\nfrom gpt2tune.tasks.compare import peak_rss_bytes\n"
            "b = bytearray(b'x' * (300 * 2**20))\n"
            "print(peak_rss_bytes(), psutil.Process().memory_info().rss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    peak, rss = map(int, out.split())
    assert peak >= rss >= 300 * 2**20  # the high-water mark includes the allocation


def test_peak_rss_is_the_workers_own_not_its_parents():
    """A worker started by a big parent reports its own high-water mark (ru_maxrss would carry
    the parent's resident set over fork + exec)."""
    parent = ("import subprocess, sys\nb = bytearray(b'x' * (600 * 2**20))\n"
              "code = 'from gpt2tune.tasks.compare import peak_rss_bytes; print(peak_rss_bytes())'\n"
              "print(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout)")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout
    assert int(out.split()[0]) < 500 * 2**20


def test_compare_classification_methods(tmp_path, run_cli):
    from test_classification import make_recipe as cls_recipe, synthetic, write_tsv

    src = write_tsv(tmp_path / "sent.tsv", synthetic(120))
    r = cls_recipe(tmp_path, "clf", src, epochs=3)
    out = tmp_path / "clf-compare"
    code, stdout, err = run_cli("compare", r, "--methods", "full,lora", "--output", out)
    assert code == 0, err
    data = json.loads((out / "comparison.json").read_text())
    rows = {x["method"]: x for x in data["methods"]}
    assert list(rows) == ["full", "lora"] and data["settings"]["task"] == "classification"
    for name, row in rows.items():
        ev = json.loads((out / name / "eval.json").read_text())
        assert row["test_accuracy"] == pytest.approx(100 * ev["test"]["accuracy"])
        assert row["test_macro_f1"] == pytest.approx(ev["test"]["macro_f1"])
        assert 0 <= row["val_accuracy"] <= 100 and row["peak_rss_mb"] > 50
    assert rows["full"]["trainable_percent"] == 100.0 and rows["lora"]["trainable_percent"] < 50
    md = (out / "comparison.md").read_text()
    assert "test accuracy %" in md and "ref ppl" not in md and (out / "comparison.png").is_file()
    bad = write_recipe(tmp_path / "bad.yaml", r.read_text() + 'compare: {reference: "text:x.txt"}\n')
    code, _, err = run_cli("compare", bad, "--methods", "full", "--output", tmp_path / "o2")
    assert code == 2 and "forgetting" in err
