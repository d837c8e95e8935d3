import pytest

from gpt2tune.evaluate.poems import (distinct_n, loose_lines, parse_poem, poem_metrics, repeated_char_rate,
                                     rhyme_checks, tone_checks)
from gpt2tune.evaluate.prosody import LEVEL, OBLIQUE, analyse, rhyme_key, tone

DENGGUANQUE = "白日依山盡，黃河入海流。欲窮千里目，更上一層樓。"
JINGYESI = "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。"


def test_parse_poem_accepts_only_the_exact_form():
    assert parse_poem(DENGGUANQUE, 4, 5) == ["白日依山盡", "黃河入海流", "欲窮千里目", "更上一層樓"]
    assert parse_poem(DENGGUANQUE, 4, 7) is None
    assert parse_poem(DENGGUANQUE, 2, 5) is None  # trailing text
    bad = [DENGGUANQUE.replace("，", "。", 1), DENGGUANQUE.replace("。", "，", 1), DENGGUANQUE[:-1],
           DENGGUANQUE + "\n", DENGGUANQUE.replace("山", "a"), DENGGUANQUE.replace("山", "1"),
           DENGGUANQUE.replace("，", ",", 1), " " + DENGGUANQUE[:-1]]
    assert all(parse_poem(b, 4, 5) is None for b in bad)
    assert loose_lines("白日依山盡，黃河入海流。欲窮", 4) == ["白日依山盡", "黃河入海流", "欲窮"]


def test_rhyme_key_drops_the_medial_and_tone_follows_pypinyin():
    assert rhyme_key("光") == rhyme_key("霜") == rhyme_key("鄉") == "ang"  # guang, shuang, xiang
    assert rhyme_key("流") == rhyme_key("樓") == "ou"  # liu (iou), lou
    assert rhyme_key("月") != rhyme_key("光")
    assert tone("山") == LEVEL and tone("河") == LEVEL and tone("海") == OBLIQUE and tone("日") == OBLIQUE
    assert analyse("a，") == [(None, None), (None, None)]


def test_rhyme_checks_compare_even_lines_with_line_two():
    assert rhyme_checks(parse_poem(JINGYESI, 4, 5)) == (1, 1)  # 鄉 rhymes with 霜
    assert rhyme_checks(parse_poem(DENGGUANQUE, 4, 5)) == (1, 1)  # 樓 with 流
    assert rhyme_checks(["白日依山盡", "黃河入海流", "欲窮千里目", "更上一層天"]) == (0, 1)
    lines8 = ["一二三四五", "黃河入海流"] * 3 + ["一二三四五", "更上一層天"]
    assert rhyme_checks(lines8) == (2, 3)


def test_tone_checks_on_a_regulated_quatrain():
    # 登鸛雀樓 follows the pattern: 2nd/4th alternate, couplets opposed and stuck, even lines end level
    assert tone_checks(parse_poem(DENGGUANQUE, 4, 5)) == (9, 9)
    # breaking the 2nd-4th alternation of line 1 (日 -> 天, level) fails that check and the 對 with line 2
    ok, n = tone_checks(["白天依山盡", "黃河入海流", "欲窮千里目", "更上一層樓"])
    assert (ok, n) == (7, 9)


def test_diversity_metrics():
    assert distinct_n([["白白白"]], 1) == pytest.approx(1 / 3)
    assert distinct_n([["白日白日"]], 2) == pytest.approx(2 / 3)  # 白日, 日白, 白日
    assert distinct_n([["白日"], ["白日"]], 2) == pytest.approx(1 / 2)
    assert repeated_char_rate(["白日白", "日月"]) == pytest.approx(2 / 5)
    assert repeated_char_rate(["春夏秋冬"]) == 0.0


def test_poem_metrics_side_by_side_inputs():
    m = poem_metrics([DENGGUANQUE, JINGYESI, "白日依山盡黃河入海流"], 4, 5)
    assert m.samples == 3 and m.form_compliance == pytest.approx(2 / 3)
    assert m.rhyme_rate == pytest.approx(2 / 2)  # the non-compliant sample has no line 4
    assert 0 < m.tone_conformity <= 1 and 0 < m.distinct_2 <= 1
    d = m.as_dict()
    assert set(d) == {"samples", "form_compliance", "rhyme_rate", "tone_conformity", "pattern_rate", "distinct_1", "distinct_2",
                      "repeated_char_rate"}
    with pytest.raises(ValueError):
        poem_metrics([], 4, 5)
