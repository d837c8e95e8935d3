"""Rhyme and tone of Chinese characters from `pypinyin` (modern readings): what the verse-form
constraint (`generate.forms`) uses, and the poem metrics (`evaluate.poems`) with prosody "modern".
The classical view (平水韻 groups, entering tones oblique) is `evaluate.classical`.

Approximations (modern Mandarin standing in for Middle Chinese):
- Rhyme: two characters rhyme when their rhyme keys are equal. The key is the character's
  pinyin final (default reading, `strict` finals) with the medial i/u/ü dropped when a vowel
  follows it: 陽 iang, 光 uang and 長 ang all have key "ang"; 流 iou and 樓 ou share "ou".
  Classical rhyme books (平水韻) group characters differently; this is the modern 韻母 view.
- Tone: pypinyin tones 1 and 2 are level (平), 3 and 4 oblique (仄); neutral tone is unknown.
  The old entering tone (入聲) is oblique in regulated verse, but many entering-tone characters
  read tone 1 or 2 today (白 bái, 國 guó) and count as level here.
- Only the default reading of a heteronym is used.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Optional

LEVEL, OBLIQUE = "平", "仄"
_VOWELS = set("aeoê")


def _finals_key(final: str) -> Optional[str]:
    if not final or not final.isascii() or not final.isalpha():
        return None
    if len(final) > 1 and final[0] in "iuv" and final[1] in _VOWELS:
        final = final[1:]
    return final


@lru_cache(maxsize=None)
def _analyse(chars: tuple[str, ...]) -> tuple[tuple[Optional[str], Optional[str]], ...]:
    from pypinyin import Style, lazy_pinyin

    finals = lazy_pinyin(list(chars), style=Style.FINALS, strict=True)
    tones = lazy_pinyin(list(chars), style=Style.TONE3, strict=True, neutral_tone_with_five=True)
    out = []
    for ch, f, t in zip(chars, finals, tones):
        if f == ch or t == ch or not t or not t[-1].isdigit():
            out.append((None, None))
            continue
        tone = {"1": LEVEL, "2": LEVEL, "3": OBLIQUE, "4": OBLIQUE}.get(t[-1])
        out.append((_finals_key(f), tone))
    return tuple(out)


def analyse(chars: Iterable[str]) -> list[tuple[Optional[str], Optional[str]]]:
    """(rhyme key, tone) for each character; None where pypinyin knows no reading."""
    return list(_analyse(tuple(chars)))


def rhyme_key(ch: str) -> Optional[str]:
    return _analyse((ch,))[0][0]


def tone(ch: str) -> Optional[str]:
    """'平' (tones 1, 2), '仄' (tones 3, 4) or None (neutral tone, unknown character)."""
    return _analyse((ch,))[0][1]
