"""Repetition loops: the generated text ends in one unit repeated over and over (the seed's greedy
run repeated one sentence for 150 tokens).

`find_loop` looks at the tail of the generated ids for the period p whose repetition covers the
most tokens; it is a loop when the unit repeats at least `min_repeats` times over at least
`min_span` tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence


@dataclass
class Loop:
    period: int  # tokens in the repeated unit
    repeats: float  # how many times it repeats (the last repetition may be partial)
    start: int  # index of the first new token inside the loop
    span: int  # tokens covered by the loop

    def as_dict(self) -> dict:
        d = asdict(self)
        d["repeats"] = round(self.repeats, 2)
        return d


def find_loop(ids: Sequence[int], min_repeats: float = 3.0, min_span: int = 12) -> Optional[Loop]:
    n = len(ids)
    best = None
    for p in range(1, int(n / min_repeats) + 1):
        run = 0
        i = n - 1
        while i - p >= 0 and ids[i] == ids[i - p]:
            run += 1
            i -= 1
        span = run + p
        if run and (best is None or span > best.span):
            best = Loop(period=p, repeats=span / p, start=n - span, span=span)
    if best is None or best.repeats < min_repeats or best.span < min_span:
        return None
    return best
