"""Poem metrics: form compliance, rhyme, tone pattern, distinct-n, repeated characters.

A sample complies with an R x C form when its text is exactly R lines of C CJK characters,
line i followed by "，" when i is odd and "。" when i is even (counted from 1), and nothing else.
Rhyme and tone come from one of two sources, `prosody`:
- "classical": the 平水韻 table (`evaluate.classical`): entering-tone characters are oblique, rhyme
  is the same 平水韻 group. A polyphonic character satisfies a check when one of its readings does;
  the poem's rhyme group is the group of line 2's last character that most even lines share.
- "modern" (the library default): today's readings from pypinyin (`evaluate.prosody`, see its
  approximations).

Tone-pattern conformity is the share of these regulated-verse checks that hold (checks that
involve a character of unknown tone are skipped):
- inside a line, the 2nd and 4th characters differ in tone, and for 7-character lines the 4th
  and 6th differ too (二四六分明; the odd positions are free, 一三五不論);
- couplets are opposed (對): the 2nd character of an odd line differs from that of the next line;
- couplets stick (黏): the 2nd character of an even line matches that of the next odd line;
- even (rhyming) lines end on a level tone.
Rhyme rate: share of even lines from line 4 on whose last character has line 2's rhyme (key or group).
Pattern rate: share of samples that have the exact form and fit one of the four standard tone
patterns of regulated verse at "standard" strictness (`evaluate.patterns`: 一三五不論, no 孤平, no
三平尾/三仄尾; characters of unknown tone fit anywhere); n/a for forms without patterns.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from gpt2tune.data.poetry import FORMS, is_cjk
from gpt2tune.evaluate import classical, patterns
from gpt2tune.evaluate.prosody import LEVEL, analyse

COMMA, STOP = "，", "。"
PROSODIES = ("classical", "modern")
_CLAUSE = re.compile(r"[，。？！；、,.?!;：:\s]+")


def form_shape(form: Optional[str] = None, rows: Optional[int] = None, cols: Optional[int] = None) -> tuple[int, int]:
    if form is not None:
        return FORMS[form]
    if rows is None or cols is None:
        raise ValueError("give a form or rows and cols")
    return rows, cols


def parse_poem(text: str, rows: int, cols: int) -> Optional[list[str]]:
    """The R lines of a compliant poem, or None when `text` is not exactly the form."""
    step = cols + 1
    if len(text) != rows * step:
        return None
    lines = []
    for i in range(rows):
        line, punct = text[i * step: i * step + cols], text[i * step + cols]
        if punct != (COMMA if i % 2 == 0 else STOP) or not all(is_cjk(ch) for ch in line):
            return None
        lines.append(line)
    return lines


def loose_lines(text: str, rows: int) -> list[str]:
    """Best-effort lines of any text: its first `rows` clauses, split at punctuation."""
    return [c for c in _CLAUSE.split(text) if c][:rows]


def _check_prosody(prosody: str) -> None:
    if prosody not in PROSODIES:
        raise ValueError(f"prosody must be one of {', '.join(PROSODIES)}, not {prosody!r}")


def rhyme_checks(lines: Sequence[str], prosody: str = "modern") -> tuple[int, int]:
    """(rhyming even lines from line 4 on, even lines from line 4 on)."""
    _check_prosody(prosody)
    if len(lines) < 2 or not lines[1]:
        return 0, max(0, len(lines) // 2 - 1)
    ends = [lines[i][-1] if lines[i] else None for i in range(3, len(lines), 2)]
    if prosody == "classical":
        groups = [classical.rhyme_groups(ch) if ch else frozenset() for ch in ends]
        hits = max((sum(g in gs for gs in groups) for g in classical.rhyme_groups(lines[1][-1])), default=0)
        return hits, len(ends)
    key = analyse(lines[1][-1])[0][0]
    hits = sum(1 for ch in ends if ch and key is not None and analyse(ch)[0][0] == key)
    return hits, len(ends)


def _tone_sets(line: str, prosody: str) -> list[frozenset]:
    """The possible tones of each character (empty: unknown)."""
    if prosody == "classical":
        return [info.tones for info in classical.analyse(line)]
    return [frozenset() if t is None else frozenset((t,)) for _, t in analyse(line)]


def tone_checks(lines: Sequence[str], prosody: str = "modern") -> tuple[int, int]:
    """(satisfied, evaluated) tone-pattern checks; see the module docstring."""
    _check_prosody(prosody)
    tones = [_tone_sets(line, prosody) for line in lines]
    ok = n = 0

    def check(a, b, same: bool):
        nonlocal ok, n
        if not a or not b:
            return
        n += 1
        ok += any((x == y) == same for x in a for y in b)

    def at(i, j):
        return tones[i][j] if 0 <= j < len(tones[i]) else None

    for i, ts in enumerate(tones):
        check(at(i, 1), at(i, 3), False)
        if len(ts) >= 7:
            check(at(i, 3), at(i, 5), False)
        if i % 2 == 1 and ts:
            check(ts[-1], frozenset((LEVEL,)), True)
        if i + 1 < len(tones):
            check(at(i, 1), at(i + 1, 1), i % 2 == 1)
    return ok, n


def pattern_of(lines: Sequence[str], rows: int, cols: int, prosody: str = "modern",
               strictness: str = "standard") -> Optional[str]:
    """The name of the standard tone pattern the poem's lines fit (`evaluate.patterns`), or None."""
    _check_prosody(prosody)
    return patterns.best_fit([_tone_sets(line, prosody) for line in lines], rows, cols, strictness)


def unclassified_chars(texts: Sequence[str], prosody: str = "modern") -> str:
    """The distinct Chinese characters of `texts` whose tone the prosody source does not know, in order."""
    _check_prosody(prosody)
    chars = [ch for t in texts for ch in t if is_cjk(ch)]
    if prosody == "classical":
        return "".join(classical.unclassified(chars))
    seen, out = set(), []
    for ch in chars:
        if ch not in seen:
            seen.add(ch)
            if analyse(ch)[0][1] is None:
                out.append(ch)
    return "".join(out)


def repeated_char_rate(lines: Sequence[str]) -> float:
    chars = [ch for line in lines for ch in line if is_cjk(ch)]
    return (len(chars) - len(set(chars))) / len(chars) if chars else 0.0


def distinct_n(poems: Sequence[Sequence[str]], n: int) -> float:
    grams = Counter()
    for lines in poems:
        for line in lines:
            chars = [ch for ch in line if is_cjk(ch)]
            grams.update(tuple(chars[i:i + n]) for i in range(len(chars) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


@dataclass
class PoemMetrics:
    samples: int
    form_compliance: float
    rhyme_rate: Optional[float]
    tone_conformity: Optional[float]
    pattern_rate: Optional[float]
    distinct_1: float
    distinct_2: float
    repeated_char_rate: float

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def poem_metrics(texts: Sequence[str], rows: int, cols: int, prosody: str = "modern") -> PoemMetrics:
    """Metrics over a set of sample texts (the poem only: no title, no framing tokens).

    Compliance needs the exact form; the other metrics use the exact lines of compliant samples
    and best-effort clauses (`loose_lines`) of the others, so unconstrained samples are comparable.
    """
    if not texts:
        raise ValueError("no samples to evaluate")
    _check_prosody(prosody)
    poems, compliant = [], 0
    rh = rt = th = tt = 0
    rep = 0.0
    fit = 0
    has_patterns = patterns.supported(rows, cols) is None
    for t in texts:
        lines = parse_poem(t, rows, cols)
        compliant += lines is not None
        fit += has_patterns and lines is not None and pattern_of(lines, rows, cols, prosody) is not None
        lines = lines if lines is not None else loose_lines(t, rows)
        poems.append(lines)
        a, b = rhyme_checks(lines, prosody)
        rh, rt = rh + a, rt + b
        a, b = tone_checks(lines, prosody)
        th, tt = th + a, tt + b
        rep += repeated_char_rate(lines)
    return PoemMetrics(samples=len(texts), form_compliance=compliant / len(texts),
                       rhyme_rate=rh / rt if rt else None, tone_conformity=th / tt if tt else None,
                       pattern_rate=fit / len(texts) if has_patterns else None,
                       distinct_1=distinct_n(poems, 1), distinct_2=distinct_n(poems, 2),
                       repeated_char_rate=rep / len(texts))
