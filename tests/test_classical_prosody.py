import json

import pytest

from gpt2tune.data.poetry import is_cjk
from gpt2tune.errors import UserError
from gpt2tune.evaluate import classical
from gpt2tune.evaluate.classical import LEVEL, OBLIQUE, POLYPHONIC
from gpt2tune.evaluate.poems import parse_poem, poem_metrics, rhyme_checks, tone_checks, unclassified_chars
from gpt2tune.evaluate.prosody import tone as modern_tone

# 杜甫《春望》 (五言律詩): rhymes 深 心 金 簪, all 下平十二侵; by today's finals shen/xin/jin/zan they do not
CHUNWANG = "國破山河在，城春草木深。感時花濺淚，恨別鳥驚心。烽火連三月，家書抵萬金。白頭搔更短，渾欲不勝簪。"
CHUNWANG_SIMPLIFIED = "国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。"
# 王維《山居秋暝》: rhymes 秋 流 舟 留, 下平十一尤
SHANJU = "空山新雨後，天氣晚來秋。明月松間照，清泉石上流。竹喧歸浣女，蓮動下漁舟。隨意春芳歇，王孫自可留。"


def test_entering_tone_characters_are_oblique_and_rhyme_groups_are_pingshui():
    for ch in "白國一十":
        assert classical.tone_class(ch) == OBLIQUE, ch
        assert all(g.startswith("入聲") for g in classical.rhyme_groups(ch)), ch
    assert modern_tone("白") == LEVEL and modern_tone("國") == LEVEL  # what the modern mode says
    assert classical.tone_class("東") == LEVEL and classical.rhyme_groups("東") == {"上平一東"}
    assert classical.rhyme_groups("冬") == {"上平二冬"} and classical.rhyme_groups("白") == {"入聲十一陌"}
    assert classical.rhymes("紅", "東") and classical.rhymes("東", "同")
    assert not classical.rhymes("東", "冬")  # one rhyme today (dong), two groups in 平水韻
    assert not classical.rhymes("東", "白")


def test_traditional_and_simplified_forms_agree():
    for trad, simp in ["國国", "東东", "紅红", "長长", "書书", "驚惊", "時时", "萬万", "頭头", "風风"]:
        t, s = classical.info(trad), classical.info(simp)
        assert t.known and t.groups == s.groups and t.tone_class == s.tone_class, (trad, simp)
    assert classical.rhymes("红", "东") and not classical.rhymes("东", "冬")
    assert classical.info("爲").groups == classical.info("為").groups  # a variant form not in the table itself
    trad = parse_poem(CHUNWANG, 8, 5)
    simp = parse_poem(CHUNWANG_SIMPLIFIED, 8, 5)
    assert rhyme_checks(trad, "classical") == rhyme_checks(simp, "classical")
    assert tone_checks(trad, "classical") == tone_checks(simp, "classical")


def test_polyphonic_characters_are_marked():
    for ch in "看過思長":
        info = classical.info(ch)
        assert info.polyphonic and info.tone_class == POLYPHONIC and info.tones == {LEVEL, OBLIQUE}, ch
    assert not classical.info("白").polyphonic and not classical.info("東").polyphonic
    # a polyphonic character satisfies a tone check with whichever reading fits: 看 in the 2nd position
    # opposes a level 4th (看 仄) as well as an oblique one (看 平)
    assert tone_checks(["一看三山五"], "classical") == (1, 1)
    assert tone_checks(["一看三水五"], "classical") == (1, 1)
    assert tone_checks(["一東三山五"], "classical") == (0, 1)


def test_regulated_poems_score_correct_classically():
    for text in (CHUNWANG, SHANJU):
        lines = parse_poem(text, 8, 5)
        assert rhyme_checks(lines, "classical") == (3, 3), text
        ok, n = tone_checks(lines, "classical")
        assert ok == n and n >= 18, (text, ok, n)
    lines = parse_poem(CHUNWANG, 8, 5)
    assert rhyme_checks(lines, "modern") == (0, 3)  # 深 心 金 簪 have different modern finals
    assert tone_checks(lines, "modern")[0] < tone_checks(lines, "modern")[1]  # 國, 白 read level today
    m = poem_metrics([CHUNWANG, SHANJU], 8, 5, prosody="classical")
    assert m.form_compliance == 1.0 and m.rhyme_rate == 1.0 and m.tone_conformity == 1.0
    # a wrong rhyme: 冬 (上平二冬) after 東 (上平一東), a rhyme in modern Mandarin
    bad = ["一二三四五", "六七八九東", "一二三四五", "六七八九冬"]
    assert rhyme_checks(bad, "classical") == (0, 1) and rhyme_checks(bad, "modern") == (1, 1)
    with pytest.raises(ValueError):
        poem_metrics([CHUNWANG], 8, 5, prosody="tang")


def test_unclassified_characters_are_reported_and_skipped():
    assert unclassified_chars([SHANJU], "classical") == "浣"  # the table lacks 浣
    assert unclassified_chars([CHUNWANG, SHANJU], "modern") == ""
    assert unclassified_chars(["啼a啼，"], "classical") == "啼"
    # a check that involves an unclassified character is skipped (《山居秋暝》 has 18 checks, 《春望》 19)
    assert tone_checks(["一浣三山五"], "classical") == (0, 0)
    assert tone_checks(parse_poem(SHANJU, 8, 5), "classical") == (18, 18)


def test_table_reading_drops_junk_and_missing_package_is_a_user_error(monkeypatch):
    t = classical.parse_table({"ping": {"上平聲部": {"上平聲一東": ["東同x（"]}},
                               "ze": {"入聲部": {"入聲十一陌": ["白Publicdomain"]}}})
    assert t == {"東": (classical.Reading(LEVEL, "上平一東"),), "同": (classical.Reading(LEVEL, "上平一東"),),
                 "白": (classical.Reading(OBLIQUE, "入聲十一陌"),)}
    assert all(is_cjk(ch) for ch in classical.table())
    assert len(classical.table()) > 8000
    monkeypatch.setattr(classical, "DIST", "no-such-distribution-gpt2tune")
    with pytest.raises(UserError, match="pip install"):
        classical.data_path()


def test_eval_poems_prosody_option(tiny_zh_model, run_cli):
    # the tiny model's vocabulary has 啼, which the 平水韻 table lacks: the prompt puts it in every sample
    args = ("eval-poems", tiny_zh_model, "--form", "wuyan-jueju", "-n", "3", "--seed", "1", "--prompt", "啼")
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "unclassified characters (constrained, classical): 啼" in out
    assert "unclassified characters (unconstrained, classical): 啼" in out
    assert "平水韻" in err
    code, out, err = run_cli(*args, "--prosody", "classical", "--json")
    res = json.loads(out)
    assert res["prosody"] == "classical" and res["constrained"]["unclassified_chars"].startswith("啼")
    code, out, err = run_cli(*args, "--prosody", "modern", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["prosody"] == "modern" and "pypinyin" in res["note"]
    assert res["constrained"]["unclassified_chars"] == "" and res["constrained"]["form_compliance"] == 1.0
    with pytest.raises(SystemExit):
        run_cli(*args, "--prosody", "tang")
