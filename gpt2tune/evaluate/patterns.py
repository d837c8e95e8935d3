"""The tone patterns (格律) of regulated verse: which tone each position of a 絕句/律詩 takes.

A line of five characters is one of four types, named by the tone of its 2nd character and of its
last one:

    仄起仄收 A 仄仄平平仄    平起平收 B 平平仄仄平    平起仄收 C 平平平仄仄    仄起平收 D 仄仄仄平平

A seven-character line puts two characters of the opposite tone in front of a five-character
one (平平 + A = 平平仄仄平平仄). A poem's pattern follows from two choices, hence four patterns:
- 起: the tone of line 1's 2nd character (平起 / 仄起);
- whether line 1 rhymes (首句入韻: it ends level) or not (it ends oblique).
Then the even lines end level (they rhyme), the other odd lines oblique; a line is opposed to the
line before it in its couplet (對: its 2nd character takes the other tone) and sticks to the last
line of the previous couplet (黏: the same tone). This holds for any even number of lines.

Strictness:
- "strict": every position takes its pattern's tone;
- "standard": 一三五不論, the odd positions (1, 3; and 5 of seven) are free, except that
  - no 三平尾 / 三仄尾: the last three characters are not all level or all oblique (the third from
    last takes its pattern tone when the last two share one);
  - no 孤平: in a B line (平平仄仄平, 仄仄平平仄仄平 in seven) whose first free position of the
    five-character core is oblique, the core's 3rd character must be level (the classical
    remedy, 拗救), so the core's 2nd level character is never alone between obliques.
  A strict pattern with a position given away (an acrostic's character at a line start) follows
  the same two rules, so relaxing one position never produces 孤平.

Tones are sets (a polyphonic character has both); a character fits a position when one of its
tones is allowed there, as `evaluate.poems` counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from gpt2tune.evaluate.prosody import LEVEL, OBLIQUE

STRICTNESS = ("strict", "standard")
PATTERN_NAMES = {  # name: (tone of line 1's 2nd character, line 1 rhymes)
    "ping-rhymed": (LEVEL, True),
    "ping-unrhymed": (LEVEL, False),
    "ze-rhymed": (OBLIQUE, True),
    "ze-unrhymed": (OBLIQUE, False),
}
BOTH = frozenset((LEVEL, OBLIQUE))
_TYPES = {  # (tone of the 2nd character, tone of the last) -> five-character line
    (OBLIQUE, OBLIQUE): "仄仄平平仄",
    (LEVEL, LEVEL): "平平仄仄平",
    (LEVEL, OBLIQUE): "平平平仄仄",
    (OBLIQUE, LEVEL): "仄仄仄平平",
}


def opposite(t: str) -> str:
    return OBLIQUE if t == LEVEL else LEVEL


def supported(rows: int, cols: int) -> Optional[str]:
    """Why tone patterns cannot apply to this form (None: they can)."""
    if cols not in (5, 7):
        return f"tone patterns are defined for lines of 5 or 7 characters, not {cols}"
    if rows < 2 or rows % 2:
        return f"tone patterns need an even number of lines (couplets), not {rows}"
    return None


@dataclass(frozen=True)
class Pattern:
    name: str
    lines: tuple[str, ...]  # one string of 平/仄 per line

    def __str__(self) -> str:
        return "，".join(self.lines)


def pattern(name: str, rows: int, cols: int) -> Pattern:
    start, rhymed = PATTERN_NAMES[name]
    lines, second = [], start
    for i in range(rows):
        if i and i % 2 == 1:
            second = opposite(second)  # 對
        end = LEVEL if (i % 2 == 1 or (i == 0 and rhymed)) else OBLIQUE
        if cols == 5:
            lines.append(_TYPES[(second, end)])
        else:
            lines.append(second * 2 + _TYPES[(opposite(second), end)])
    return Pattern(name, tuple(lines))


def patterns(rows: int, cols: int, names: Optional[Sequence[str]] = None) -> list[Pattern]:
    why = supported(rows, cols)
    if why:
        raise ValueError(why)
    return [pattern(n, rows, cols) for n in (names or PATTERN_NAMES)]


def allowed(p: Pattern, line: int, pos: int, history: Sequence[frozenset], strictness: str,
            relaxed: bool = False) -> frozenset:
    """The tones position `pos` (0-based) of line `line` may take under pattern `p`, given the tones
    of the line's earlier characters (`history`, sets; empty = unknown). `relaxed`: this position is
    given away (any tone)."""
    tones = p.lines[line]
    cols = len(tones)
    base = tones[pos]
    if relaxed:
        return BOTH
    core = cols - 5  # index of the five-character core's first character
    if strictness == "standard" and pos % 2 == 0 and pos != cols - 1:
        if pos == cols - 3 and tones[-1] == tones[-2]:
            return frozenset((base,))  # no 三平尾 / 三仄尾
        if pos == core + 2 and _lonely_level(tones, history, core):
            return frozenset((LEVEL,))  # no 孤平
        return BOTH
    if pos == core + 2 and _lonely_level(tones, history, core):
        return frozenset((LEVEL,))  # a relaxed position before: remedy it
    return frozenset((base,))


def _lonely_level(tones: str, history: Sequence[frozenset], core: int) -> bool:
    """In a B line (core 平平仄仄平), the core's first character is only oblique."""
    if tones[core + 1] != LEVEL or tones[-1] != LEVEL or len(history) <= core:
        return False
    return history[core] == frozenset((OBLIQUE,))


def fits(lines: Sequence[Sequence[frozenset]], p: Pattern, strictness: str) -> bool:
    """Whether every character (tone sets; empty = unknown, skipped) fits the pattern."""
    if len(lines) != len(p.lines):
        return False
    for i, ts in enumerate(lines):
        if len(ts) != len(p.lines[i]):
            return False
        for j, t in enumerate(ts):
            if t and not (t & allowed(p, i, j, ts[:j], strictness)):
                return False
    return True


def best_fit(lines: Sequence[Sequence[frozenset]], rows: int, cols: int, strictness: str) -> Optional[str]:
    """The name of the first standard pattern the poem fits, or None."""
    if supported(rows, cols):
        return None
    for p in patterns(rows, cols):
        if fits(lines, p, strictness):
            return p.name
    return None
