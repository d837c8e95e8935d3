"""gpt2tune lr-find: the exponential ramp on a tiny real model, the early stop, the suggestion rule."""

import json
import math

import pytest

from conftest import ZH_TEXT, write_recipe
from gpt2tune.errors import UserError

RECIPE = """
task: {task}
model: {{init: scratch, size: nano, tokenizer: from-data}}
data: {{source: "text:{src}", val_fraction: 0.2, max_length: 40}}
train: {{precision: fp32, lr: 1.0e-3, batch_size: 4, seed: 7, num_threads: 1}}
output: {{dir: "{out}"}}
"""


def make_recipe(tmp, task="causal-lm"):
    src = tmp / "poems.txt"
    src.write_text("\n".join(ZH_TEXT * 10), encoding="utf-8")
    return write_recipe(tmp / "r.yaml", RECIPE.format(task=task, src=src, out=tmp / "runs" / "r"))


def test_lr_find_on_a_tiny_model_ramps_stops_and_suggests_inside_the_ramp(tmp_path, run_cli):
    out = tmp_path / "lrf"
    start, end, steps = 1e-5, 100.0, 50
    code, stdout, err = run_cli("lr-find", make_recipe(tmp_path), "--start", start, "--end", end, "--steps", steps,
                                "--output", out, "--no-progress")
    assert code == 0, err
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "lr_find.png").stat().st_size > 10000
    r = json.loads((out / "lr_find.json").read_text())
    lrs, sm = r["lrs"], r["smoothed"]
    # an exponential ramp from --start, one learning rate per optimizer step
    assert lrs[0] == pytest.approx(start)
    ratio = (end / start) ** (1 / (steps - 1))
    assert all(b / a == pytest.approx(ratio) for a, b in zip(lrs, lrs[1:]))
    # lr 100 diverges: stopped early, when the smoothed loss first passed 4x its best
    assert r["stopped_early"] and r["steps_done"] == len(lrs) < steps
    assert sm[-1] > 4 * min(sm) and all(s <= 4 * min(sm[:i + 1]) for i, s in enumerate(sm[:-1]))
    assert sm[0] == pytest.approx(r["losses"][0])  # bias-corrected average: starts at the first loss
    # the suggestion: strictly inside the ramp, before the minimum, where the smoothed loss falls
    s = r["suggestion"]
    assert start < s["steepest"] < lrs[-1] < end and s["steepest"] in lrs
    assert s["steepest"] < s["minimum_lr"] and s["steepest_slope"] < 0
    i = lrs.index(s["steepest"])
    assert sm[i + 1] < sm[i]
    assert s["minimum_over_10"] == pytest.approx(lrs[sm.index(min(sm))] / 10)
    assert r["suggested_lr"] == s["steepest"]
    assert f"suggested train.lr: {s['steepest']:.2e}" in stdout
    assert not (out / "model").exists() and not (out / "checkpoints").exists()  # nothing trained for keeps


def test_lr_find_classification(tmp_path, run_cli):
    rows = [(lab, f"the film was {w} and long") for i in range(30) for lab, w in
            (("pos", ["good", "great", "nice"][i % 3]), ("neg", ["bad", "awful", "poor"][i % 3]))]
    (tmp_path / "s.tsv").write_text("".join(f"{lab}\t{t}\n" for lab, t in rows), encoding="utf-8")
    r = write_recipe(tmp_path / "c.yaml", f"""
task: classification
model: {{init: scratch, size: nano, tokenizer: from-data, vocab_size: 200, n_positions: 64}}
data: {{source: "tsv:{tmp_path / 's.tsv'}", columns: [label, text], max_length: 40}}
train: {{precision: fp32, batch_size: 8, num_threads: 1}}
""")
    code, stdout, err = run_cli("lr-find", r, "--steps", 30, "--start", 1e-5, "--end", 1, "--output",
                                tmp_path / "o", "--no-progress")
    assert code == 0, err
    res = json.loads((tmp_path / "o" / "lr_find.json").read_text())
    assert res["task"] == "classification" and res["method"] == "partial"  # the classifier's default method
    assert 1e-5 < res["suggested_lr"] < 1 and res["losses"][0] == pytest.approx(math.log(2), abs=0.3)  # 2 classes


def test_lr_find_refuses_bad_arguments_before_anything_runs(tmp_path, run_cli):
    r = make_recipe(tmp_path)
    for args, msg in ((("--start", 1, "--end", 1e-3), "0 < --start < --end"), (("--steps", 2), "--steps >= 5")):
        code, _, err = run_cli("lr-find", r, *args, "--output", tmp_path / "o")
        assert code == 2 and msg in err
    code, _, err = run_cli("lr-find", make_recipe(tmp_path, "chat"), "--output", tmp_path / "o")
    assert code == 2 and "lr-find runs tasks causal-lm and classification, not chat" in err
    assert not (tmp_path / "o").exists()


# -- the suggestion rule ------------------------------------------------------------------------


def test_suggestion_is_the_steepest_descent_of_a_synthetic_curve():
    """A loss that falls along a tanh in log10(lr) centred on 1e-3, then blows up past 1e-1: the steepest
    point is the centre, the minimum sits before the blow-up; noise-free, so the smoothing's lag is the
    only shift (taken out by smoothing with beta 0)."""
    from gpt2tune.train.lr_find import suggest

    n = 121
    lrs = [10 ** (-6 + 6 * i / (n - 1)) for i in range(n)]  # 1e-6 .. 1, 20 points per decade
    loss = [3.0 - 2.0 * math.tanh((math.log10(x) + 3) / 0.5) + (50 * (x - 0.1) if x > 0.1 else 0.0) for x in lrs]
    s = suggest(lrs, loss)
    assert s["steepest"] == pytest.approx(1e-3, rel=0.13)  # within one step of the centre (10**0.05 apart)
    assert s["steepest"] < 1e-3 * 1.13 and s["steepest_slope"] < -2.0 / 0.5 * math.log10(math.e) * 0.99
    j = min(range(n), key=loss.__getitem__)
    assert s["minimum_lr"] == lrs[j] and 1e-2 < lrs[j] <= 0.11
    assert s["minimum_over_10"] == pytest.approx(lrs[j] / 10)
    # the first tenth of the ramp is never chosen, even where it falls steepest
    early = [x for x in loss]
    early[1] = early[0] - 100.0
    assert suggest(lrs, early)["steepest"] == pytest.approx(s["steepest"])
    with pytest.raises(UserError, match="too few"):
        suggest(lrs[:1], loss[:1])


def test_smoothing_is_a_bias_corrected_moving_average():
    from gpt2tune.train.lr_find import smooth

    assert smooth([2.0] * 50) == pytest.approx([2.0] * 50)  # no drift towards 0 at the start
    s = smooth([1.0] * 10 + [5.0] * 10, beta=0.5)
    assert s[9] == pytest.approx(1.0) and s[10] == pytest.approx(3.0, rel=1e-3) and 4.9 < s[-1] < 5.0
