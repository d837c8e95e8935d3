"""Poem metrics: form compliance, rhyme, tone pattern, distinct-n, repeated characters.

A sample complies with an R x C form when its text is exactly R lines of C CJK characters,
line i followed by "，" when i is odd and "。" when i is even (counted from 1), and nothing else.
Rhyme and tone come from `evaluate.prosody` (see its approximations).

Tone-pattern conformity is the share of these regulated-verse checks that hold (checks that
involve a character of unknown tone are skipped):
- inside a line, the 2nd and 4th characters differ in tone, and for 7-character lines the 4th
  and 6th differ too (二四六分明; the odd positions are free, 一三五不論);
- couplets are opposed (對): the 2nd character of an odd line differs from that of the next line;
- couplets stick (黏): the 2nd character of an even line matches that of the next odd line;
- even (rhyming) lines end on a level tone.
Rhyme rate: share of even lines from line 4 on whose last character has line 2's rhyme key.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from gpt2tune.data.poetry import FORMS, is_cjk
from gpt2tune.evaluate.prosody import LEVEL, analyse

COMMA, STOP = "，", "。"
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


def rhyme_checks(lines: Sequence[str]) -> tuple[int, int]:
    """(rhyming even lines from line 4 on, even lines from line 4 on)."""
    if len(lines) < 2 or not lines[1]:
        return 0, max(0, len(lines) // 2 - 1)
    key = analyse(lines[1][-1])[0][0]
    hits = total = 0
    for i in range(3, len(lines), 2):
        total += 1
        if lines[i] and key is not None and analyse(lines[i][-1])[0][0] == key:
            hits += 1
    return hits, total


def tone_checks(lines: Sequence[str]) -> tuple[int, int]:
    """(satisfied, evaluated) tone-pattern checks; see the module docstring."""
    tones = [[t for _, t in analyse(line)] for line in lines]
    ok = n = 0

    def check(a, b, same: bool):
        nonlocal ok, n
        if a is None or b is None:
            return
        n += 1
        ok += (a == b) == same

    def at(i, j):
        return tones[i][j] if 0 <= j < len(tones[i]) else None

    for i, ts in enumerate(tones):
        check(at(i, 1), at(i, 3), False)
        if len(ts) >= 7:
            check(at(i, 3), at(i, 5), False)
        if i % 2 == 1 and ts:
            check(ts[-1], LEVEL, True)
        if i + 1 < len(tones):
            check(at(i, 1), at(i + 1, 1), i % 2 == 1)
    return ok, n


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
    distinct_1: float
    distinct_2: float
    repeated_char_rate: float

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def poem_metrics(texts: Sequence[str], rows: int, cols: int) -> PoemMetrics:
    """Metrics over a set of sample texts (the poem only: no title, no framing tokens).

    Compliance needs the exact form; the other metrics use the exact lines of compliant samples
    and best-effort clauses (`loose_lines`) of the others, so unconstrained samples are comparable.
    """
    if not texts:
        raise ValueError("no samples to evaluate")
    poems, compliant = [], 0
    rh = rt = th = tt = 0
    rep = 0.0
    for t in texts:
        lines = parse_poem(t, rows, cols)
        compliant += lines is not None
        lines = lines if lines is not None else loose_lines(t, rows)
        poems.append(lines)
        a, b = rhyme_checks(lines)
        rh, rt = rh + a, rt + b
        a, b = tone_checks(lines)
        th, tt = th + a, tt + b
        rep += repeated_char_rate(lines)
    return PoemMetrics(samples=len(texts), form_compliance=compliant / len(texts),
                       rhyme_rate=rh / rt if rt else None, tone_conformity=th / tt if tt else None,
                       distinct_1=distinct_n(poems, 1), distinct_2=distinct_n(poems, 2),
                       repeated_char_rate=rep / len(texts))
