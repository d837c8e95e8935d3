"""`gpt2tune prefer`: pairs from scored poems, rhyme contrasts, a preference round end to end."""

import json
from types import SimpleNamespace

import pytest

from conftest import TANG_MINI, need
from gpt2tune.errors import UserError
from gpt2tune.evaluate import classical
from gpt2tune.evaluate.poems import parse_poem
from gpt2tune.generate.forms import form_spec
from gpt2tune.tasks.prefer import make_pairs, rhyme_contrasts

# rhymes 流 / 樓 (下平十一尤)
GOOD = "白日依山盡，黃河入海流。欲窮千里目，更上一層樓。"
BROKEN = "白日依山盡，黃河入海"


def _s(text, prompt_index=0, head=""):
    return SimpleNamespace(text=text, completion=text[len(head):], prompt_index=prompt_index)


def test_pairs_join_the_best_with_the_worst_past_the_margin():
    samples = [_s("a"), _s("b"), _s("c"), _s("d"), _s("e", 1), _s("f", 1)]
    pairs = make_pairs(samples, [13.0, 1.0, 12.5, 12.0, 5.0, 4.5], ["", "春"], margin=1.0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "b")]  # c vs d differ by 0.5; e vs f too
    pairs = make_pairs(samples, [13.0, 1.0, 12.5, 2.0, 9.0, 4.5], ["", "春"], margin=1.0)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("", "a", "b"), ("", "c", "d"),
                                                                          ("春", "e", "f")]
    dup = make_pairs([_s("a"), _s("a"), _s("b")], [13.0, 13.0, 1.0], [""], 1.0)
    assert [(p["chosen"], p["rejected"]) for p in dup] == [("a", "b")]  # a sample is never paired with itself


def test_rhyme_contrast_breaks_exactly_one_rhyme():
    spec = form_spec("wuyan-jueju", rhyme=True, prosody="classical", tones="standard")
    other = _s("春眠不覺曉，處處聞啼鳥。夜來風雨聲，花落知多少。")  # its line ends give the swap pool: 聲 (庚)
    pairs = rhyme_contrasts([_s(GOOD), _s(BROKEN), other], [""], spec, seed=0)
    assert len(pairs) == 1  # only GOOD has the exact form and rhymes in a level tone (鳥/少 are oblique)
    p = pairs[0]
    chosen, rejected = parse_poem(p["chosen"], 4, 5), parse_poem(p["rejected"], 4, 5)
    diff = [(i, j) for i in range(4) for j in range(5) if chosen[i][j] != rejected[i][j]]
    assert diff == [(3, 4)]  # the last character of line 4, nothing else
    assert not classical.rhymes(rejected[3][-1], chosen[1][-1])
    # a prompt is never changed: with line 4 in the prompt there is nothing to contrast
    assert rhyme_contrasts([_s(GOOD, head=GOOD[:-1]), other], [GOOD[:-1]], spec, seed=0) == []


def test_prefer_round_end_to_end(tmp_path, run_cli):
    base = need(TANG_MINI)
    out = tmp_path / "prefer"
    code, text, err = run_cli("prefer", base, "--form", "wuyan-jueju", "-n", "8", "--rounds", "1",
                              "--eval-samples", "4", "--epochs", "1", "--output", out, "--no-progress")
    assert code == 0, err
    res = json.loads((out / "prefer.json").read_text())
    assert [r["round"] for r in res["rounds"]] == [0, 1]
    assert 0 <= res["rounds"][1]["metrics"]["form_compliance"] <= 1
    pairs = [json.loads(x) for x in (out / "round-1" / "pairs.jsonl").read_text().splitlines()]
    scored = [p for p in pairs if "score_chosen" in p]
    assert scored and all(p["score_chosen"] - p["score_rejected"] >= 1.0 for p in scored)
    assert any(p.get("kind") == "rhyme-contrast" for p in pairs)
    assert (out / "prefer.png").stat().st_size > 0 and "| form compliance |" in (out / "prefer.md").read_text()
    from transformers import AutoModelForCausalLM  # the round's model is a plain HF model

    AutoModelForCausalLM.from_pretrained(out / "round-1" / "run" / "model")
    code, text, err = run_cli("prefer", base, "--form", "wuyan-jueju", "--output", out)
    assert code != 0 and "--overwrite" in err


def test_an_adapter_run_must_be_merged_first(tmp_path):
    from gpt2tune.tasks.prefer import PreferConfig, prefer

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="merge"):
        prefer(PreferConfig(model=str(tmp_path), form="wuyan-jueju", output=str(tmp_path / "o")))
