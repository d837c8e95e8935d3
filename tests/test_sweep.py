"""gpt2tune sweep: points in their own processes, the table, the plot, the best point and its recipe."""

import csv
import json
import math

import pytest
import yaml

from conftest import ZH_TEXT, write_recipe
from gpt2tune.errors import UserError

RECIPE = """
task: causal-lm
model: {{init: scratch, size: nano, tokenizer: from-data}}
data: {{source: "text:{src}", val_fraction: 0.2, max_length: 40}}
train: {{precision: fp32, lr: 1.0e-3, batch_size: 4, max_steps: 10, log_every: 5, seed: 7, num_threads: 1}}
output: {{dir: "{out}"}}
"""
LRS = ["1e-4", "3e-3", "3e-2"]


def make_recipe(tmp):
    src = tmp / "poems.txt"
    src.write_text("\n".join(ZH_TEXT * 10), encoding="utf-8")
    return write_recipe(tmp / "s.yaml", RECIPE.format(src=src, out=tmp / "runs" / "s"))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("sweep")
    r = make_recipe(tmp)
    out = tmp / "sw"
    proc = subprocess.run([sys.executable, "-m", "gpt2tune", "sweep", str(r), "--grid", "train.lr=" + ",".join(LRS),
                           "--output", str(out), "--no-progress", "--set", "train.log_every=2"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return tmp, r, out, proc.stdout


def test_sweep_over_three_learning_rates_writes_the_reports_and_names_the_best(swept):
    tmp, _, out, stdout = swept
    for f in ("sweep.md", "sweep.csv", "sweep.json", "sweep.png", "best.yaml"):
        assert (out / f).is_file() and (out / f).stat().st_size > 100, f
    data = json.loads((out / "sweep.json").read_text())
    rows = data["points"]
    assert [r["train.lr"] for r in rows] == [float(v) for v in LRS] and all(r["status"] == "ok" for r in rows)
    # each point is a real run: its own folder, its own learning rate, the --set override, its eval.json
    for r in rows:
        run = out / r["point"]
        resolved = yaml.safe_load((run / "recipe.yaml").read_text())
        assert resolved["train"]["lr"] == r["train.lr"] and resolved["train"]["log_every"] == 2
        assert resolved["output"]["dir"] == str(run)
        assert r["metric"] == json.loads((run / "eval.json").read_text())["validation"]["perplexity"]
    assert len({r["metric"] for r in rows}) == 3  # the learning rate mattered
    # the best is the minimum of the table's perplexities, named everywhere
    best = min(rows, key=lambda r: r["metric"])
    assert data["best"]["point"] == best["point"] and data["best"]["metric"] == best["metric"]
    assert data["settings"]["metric"] == "validation perplexity" and data["settings"]["mode"] == "min"
    assert f"best: {best['point']}" in stdout
    md = (out / "sweep.md").read_text()
    assert f"**Best: {best['point']}**" in md and md.count("\n| ") == 1 + 3 and f"| {best['point']} |" in md
    assert [line for line in md.splitlines() if line.endswith("| best |")] == \
        [line for line in md.splitlines() if line.startswith(f"| {best['point']} |")]
    with open(out / "sweep.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [row["point"] for row in table] == [r["point"] for r in rows]
    assert min(table, key=lambda row: float(row["metric"]))["point"] == best["point"]
    # best.yaml: the best run's resolved recipe, output.dir back to the recipe's own, loadable as is
    from gpt2tune.recipe import load_recipe

    again = load_recipe(out / "best.yaml")
    assert again.train.lr == best["train.lr"] and again.train.log_every == 2
    assert again.output.dir == str(tmp / "runs" / "s")


def test_sweep_refuses_to_overwrite_and_checks_every_point_first(swept, run_cli):
    tmp, r, out, _ = swept
    code, _, err = run_cli("sweep", r, "--grid", "train.lr=1e-3", "--output", out)
    assert code == 2 and "--overwrite" in err
    code, _, err = run_cli("sweep", r, "--grid", "train.lr=1e-3,-1", "--output", tmp / "o1")
    assert code == 2 and "train.lr=-1" in err and "greater than 0" in err
    code, _, err = run_cli("sweep", r, "--grid", "train.lrr=1,2", "--output", tmp / "o2")
    assert code == 2 and "no field 'lrr'" in err
    code, _, err = run_cli("sweep", r, "--grid", "train.lr=1e-5:1e-3:log", "--output", tmp / "o3")
    assert code == 2 and "needs --random N" in err
    assert not any((tmp / n).exists() for n in ("o1", "o2", "o3"))  # refused before anything ran


def test_a_failing_point_is_marked_and_the_sweep_goes_on(tmp_path, run_cli):
    r = make_recipe(tmp_path)
    out = tmp_path / "sw"
    code, stdout, err = run_cli("sweep", r, "--grid", f"model.tokenizer=from-data,{tmp_path / 'no-such-tokenizer'}",
                                "--output", out, "--no-progress", "--set", "train.max_steps=4")
    assert code == 0, err
    rows = json.loads((out / "sweep.json").read_text())["points"]
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[1]["metric"] is None and math.isfinite(rows[0]["metric"])
    assert "Failed or non-finite: 02-" in (out / "sweep.md").read_text()
    assert json.loads((out / "sweep.json").read_text())["best"]["point"] == rows[0]["point"]


def test_dry_run_lists_the_points_and_writes_nothing(tmp_path, run_cli):
    r = make_recipe(tmp_path)
    code, stdout, err = run_cli("sweep", r, "--grid", "train.lr=1e-4,1e-3", "--grid", "train.batch_size=2,4,8",
                                "--output", tmp_path / "o", "--dry-run")
    assert code == 0, err
    assert stdout.count("\n| 0") == 6 and "| 06-lr=1e-3_batch_size=8 | 1e-3 | 8 |" in stdout
    assert not (tmp_path / "o").exists()


# -- the pieces ---------------------------------------------------------------------------------


def test_axes_lists_ranges_and_grids():
    from gpt2tune.tasks.sweep import parse_axis

    assert parse_axis("train.lr=1e-4,3e-4").values == ["1e-4", "3e-4"]
    assert parse_axis("train.betas=[0.9,0.99],[0.9,0.999]").values == ["[0.9,0.99]", "[0.9,0.999]"]
    assert parse_axis("data.source=text:a.txt,text:b.txt").values == ["text:a.txt", "text:b.txt"]
    a = parse_axis("train.lr=1e-5:1e-3:log:3")
    assert a.is_range and a.log and not a.integer and a.grid_values() == ["1e-05", "0.0001", "0.001"]
    assert parse_axis("method.rank=4:16:4").grid_values() == ["4", "8", "12", "16"]
    for bad, msg in (("train.lr", "FIELD="), ("train.lr=1e-3:1e-5", "LOW < HIGH"), ("train.lr=0:1:log", "LOW > 0"),
                     ("train.lr=1,1", "twice"), ("train.lr=1e-5:1e-3:cube", "unknown range option"),
                     ("train.lr=1,", "empty value")):
        with pytest.raises(UserError, match=msg):
            parse_axis(bad)


def test_random_points_are_seeded_inside_their_ranges_and_distinct():
    from gpt2tune.tasks.sweep import parse_axis, plan_points

    axes = [parse_axis("train.lr=1e-5:1e-3:log"), parse_axis("method.rank=4:32"), parse_axis("train.batch_size=8,16")]
    pts = plan_points(axes, 40, seed=3)
    assert pts == plan_points(axes, 40, seed=3) and pts != plan_points(axes, 40, seed=4)
    assert len(pts) == 40 and len({tuple(p.values()) for p in pts}) == 40
    lrs = [float(p["train.lr"]) for p in pts]
    assert all(1e-5 <= v <= 1e-3 for v in lrs)
    assert sum(v < 1e-4 for v in lrs) >= 10  # log-uniform: about half below the geometric middle
    assert all(p["method.rank"].isdigit() and 4 <= int(p["method.rank"]) <= 32 for p in pts)
    assert {p["train.batch_size"] for p in pts} == {"8", "16"}
    assert len(plan_points([parse_axis("train.lr=1,2")], 5, seed=0)) == 2  # a list holds only 2 points
    grid = plan_points([parse_axis("train.lr=1,2"), parse_axis("train.batch_size=4,8,16")], None, seed=0)
    assert len(grid) == 6 and grid[1] == {"train.lr": "1", "train.batch_size": "8"}


def test_metric_names_and_direction():
    from gpt2tune.tasks.sweep import metric_mode, parse_metric

    assert parse_metric("validation perplexity", "causal-lm") == ("validation", "perplexity")
    assert parse_metric("test.macro_f1", "classification") == ("test", "macro_f1")
    assert parse_metric(None, "causal-lm") == ("validation", "perplexity")
    assert parse_metric(None, "classification") == ("validation", "accuracy")
    assert parse_metric(None, "preference") == ("validation", "reward_accuracy")
    assert metric_mode("reward_accuracy", None) == "max"
    assert metric_mode("loss", None) == "min" and metric_mode("macro_f1", None) == "max"
    assert metric_mode("tokens", "max") == "max"
    with pytest.raises(UserError, match="--mode"):
        metric_mode("tokens", None)
