"""Tone patterns of regulated verse: the table, the evaluation, and decoding that keeps them."""

import pytest

from conftest import TANG_MINI, need
from gpt2tune.errors import UserError
from gpt2tune.evaluate import classical
from gpt2tune.evaluate import patterns as tp
from gpt2tune.evaluate.poems import parse_poem, pattern_of, poem_metrics
from gpt2tune.generate.forms import form_spec, tone_sets
from gpt2tune.generate.sampling import Sampling
from gpt2tune.generate.text import generate_texts

# 王之渙《登鸛雀樓》: 仄起首句不入韻; 欲 (仄) stands where the pattern has 平: 一三五不論
DENGGUANQUE = "白日依山盡，黃河入海流。欲窮千里目，更上一層樓。"
# 杜牧《清明》: 平起首句入韻 (七言)
QINGMING = "清明時節雨紛紛，路上行人欲斷魂。借問酒家何處有，牧童遙指杏花村。"
T = {"平": frozenset("平"), "仄": frozenset("仄")}


def _tones(s: str):
    return [T[c] for c in s]


def test_the_four_patterns_are_the_textbook_ones():
    five = {n: str(tp.pattern(n, 4, 5)) for n in tp.PATTERN_NAMES}
    assert five["ze-unrhymed"] == "仄仄平平仄，平平仄仄平，平平平仄仄，仄仄仄平平"
    assert five["ze-rhymed"] == "仄仄仄平平，平平仄仄平，平平平仄仄，仄仄仄平平"
    assert five["ping-unrhymed"] == "平平平仄仄，仄仄仄平平，仄仄平平仄，平平仄仄平"
    assert five["ping-rhymed"] == "平平仄仄平，仄仄仄平平，仄仄平平仄，平平仄仄平"
    assert str(tp.pattern("ping-rhymed", 4, 7)) == "平平仄仄仄平平，仄仄平平仄仄平，仄仄平平平仄仄，平平仄仄仄平平"
    lv = tp.pattern("ze-unrhymed", 8, 5).lines  # a 律詩 repeats the couplets, sticking (黏) between them
    assert lv[4:] == lv[:4]
    assert tp.supported(4, 6) and tp.supported(3, 5) and tp.supported(8, 7) is None


def test_standard_strictness_frees_odd_positions_but_not_gu_ping_or_three_level_tails():
    b = tp.pattern("ping-rhymed", 2, 5)  # line 1: 平平仄仄平 (B), line 2: 仄仄仄平平 (D)
    ok = [_tones("平平仄仄平"), _tones("仄仄仄平平")]
    assert tp.fits(ok, b, "strict") and tp.fits(ok, b, "standard")
    free = [_tones("平平平仄平"), _tones("平仄仄平平")]  # positions 3 of line 1 and 1 of line 2 changed
    assert not tp.fits(free, b, "strict") and tp.fits(free, b, "standard")
    gu_ping = [_tones("仄平仄仄平"), _tones("仄仄仄平平")]  # 孤平: the 平 at 2 alone between obliques
    assert not tp.fits(gu_ping, b, "standard")
    remedied = [_tones("仄平平仄平"), _tones("仄仄仄平平")]  # 拗救: the 3rd level makes up for the 1st
    assert tp.fits(remedied, b, "standard")
    san_ping = [_tones("平平仄仄平"), _tones("仄仄平平平")]  # 三平尾
    assert not tp.fits(san_ping, b, "standard")
    assert not tp.fits([_tones("仄仄平平平")[:4] + [T["平"]], ok[1]], b, "standard")  # position 2 is never free
    seven = tp.pattern("ze-rhymed", 2, 7)  # 仄仄平平仄仄平: 孤平 is judged on the five-character core
    assert tp.fits([_tones("平仄平平仄仄平"), _tones("平平仄仄仄平平")], seven, "standard")
    assert not tp.fits([_tones("仄仄仄平仄仄平"), _tones("平平仄仄仄平平")], seven, "standard")


def test_famous_poems_fit_their_patterns():
    lines = parse_poem(DENGGUANQUE, 4, 5)
    assert pattern_of(lines, 4, 5, "classical", "standard") == "ze-unrhymed"
    assert pattern_of(lines, 4, 5, "classical", "strict") is None  # 欲 is oblique where the pattern says level
    assert pattern_of(parse_poem(QINGMING, 4, 7), 4, 7, "classical", "standard") == "ping-rhymed"
    m = poem_metrics([DENGGUANQUE, QINGMING[:16]], 4, 5, "classical")
    assert m.pattern_rate == 0.5
    assert poem_metrics([DENGGUANQUE], 3, 5, "classical").pattern_rate is None  # no pattern for 3 lines


def test_tone_options_are_validated():
    with pytest.raises(UserError, match="5 or 7"):
        form_spec(rows=4, cols=6, tones="strict")
    with pytest.raises(UserError, match="even number"):
        form_spec(rows=3, cols=5, tones="standard")
    with pytest.raises(UserError, match="--tones"):
        form_spec("wuyan-jueju", pattern="ze-rhymed")
    with pytest.raises(UserError, match="--rhyme"):
        form_spec("wuyan-jueju", rhyme_group="東")
    with pytest.raises(UserError, match="verse form"):
        form_spec(tones="strict")
    assert form_spec("qiyan-lvshi", tones="standard", pattern="ping-unrhymed").tones == "standard"


@pytest.fixture(scope="module")
def tang():
    from gpt2tune.method.io import load_run

    return load_run(need(TANG_MINI))


def _poems(tang, spec, n=20, seed=1, prompt=""):
    model, tok, framing = tang
    samples, _ = generate_texts(model, tok, framing, [prompt], Sampling(num_return_sequences=n, seed=seed, top_k=40),
                                form=spec)
    return [s.text for s in samples]


def _fits(text, spec, strictness, name=None):
    lines = parse_poem(text, spec.rows, spec.cols)
    assert lines is not None, text
    tones = [tone_sets(list(line), "classical") for line in lines]
    pats = tp.patterns(spec.rows, spec.cols, [name] if name else None)
    return any(tp.fits(tones, p, strictness) for p in pats)


@pytest.mark.parametrize("form", ["wuyan-jueju", "qiyan-jueju", "wuyan-lvshi", "qiyan-lvshi"])
def test_strict_tones_and_rhyme_hold_on_every_form(tang, form):
    spec = form_spec(form, rhyme=True, prosody="classical", tones="strict")
    texts = _poems(tang, spec)
    for t in texts:
        assert _fits(t, spec, "strict"), t
        assert not classical.unclassified(t)
    m = poem_metrics(texts, spec.rows, spec.cols, "classical")
    assert (m.form_compliance, m.rhyme_rate, m.tone_conformity, m.pattern_rate) == (1.0, 1.0, 1.0, 1.0)
    assert m.distinct_2 > 0.6  # still varied


def test_acrostic_relaxes_only_the_line_starts(tang):
    spec = form_spec("qiyan-jueju", acrostic="春夏秋冬", rhyme=True, prosody="classical", tones="strict")
    texts = _poems(tang, spec)
    m = poem_metrics(texts, 4, 7, "classical")
    assert (m.form_compliance, m.rhyme_rate, m.tone_conformity, m.pattern_rate) == (1.0, 1.0, 1.0, 1.0)
    for t in texts:
        assert [line[0] for line in parse_poem(t, 4, 7)] == list("春夏秋冬")


def test_a_chosen_pattern_and_rhyme_group_are_kept(tang):
    spec = form_spec("wuyan-lvshi", rhyme=True, prosody="classical", tones="strict", pattern="ping-rhymed",
                     rhyme_group="东")
    texts = _poems(tang, spec)
    for t in texts:
        assert _fits(t, spec, "strict", "ping-rhymed"), t
        lines = parse_poem(t, 8, 5)
        ends = [lines[0][-1]] + [line[-1] for line in lines[1::2]]
        assert all("上平一東" in classical.rhyme_groups(ch) for ch in ends), t  # line 1 rhymes too (入韻)
    spec = form_spec("qiyan-jueju", rhyme=True, prosody="classical", tones="strict", pattern="ze-rhymed")
    for t in _poems(tang, spec):
        lines = parse_poem(t, 4, 7)
        assert _fits(t, spec, "strict", "ze-rhymed") and classical.rhymes(lines[0][-1], lines[1][-1]), t


def test_standard_tones_with_a_prompt(tang):
    spec = form_spec("qiyan-jueju", rhyme=True, prosody="classical", tones="standard")
    texts = _poems(tang, spec, prompt="白日")
    for t in texts:
        assert t.startswith("白日") and _fits(t, spec, "standard"), t
    assert not all(_fits(t, spec, "strict") for t in texts)  # the odd positions are really free
