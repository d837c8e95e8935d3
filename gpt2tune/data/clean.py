"""Text cleaning: Unicode normalisation, control characters, whitespace, length filters."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Optional

_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
# what Python's str.splitlines() and Unicode call a line break: each becomes "\n", so that
# dropping control characters never glues two lines (or two words) together
_BREAKS = re.compile("\r\n|[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


DROPPED = ("Cc", "Cf", "Cs")  # Unicode categories removed by clean_text (not "\n" and "\t")
_KEPT: set[str] = set("\n\t")  # characters seen so far, by fate (a corpus uses a few thousand)
_GONE: set[str] = set()


def drop_controls(text: str) -> str:
    """`text` without its characters of a DROPPED category: each distinct character's category is
    looked up once per process, and most texts (printable) need no pass over their characters."""
    if text.isprintable():
        return text
    chars = set(text)
    for ch in chars - _KEPT - _GONE:
        (_GONE if unicodedata.category(ch) in DROPPED else _KEPT).add(ch)
    gone = chars & _GONE
    return text.translate(dict.fromkeys(map(ord, gone))) if gone else text


def clean_text(text: str, normalize: str = "nfc", whitespace: bool = True) -> str:
    if normalize != "none":
        text = unicodedata.normalize(normalize.upper(), text)
    text = _BREAKS.sub("\n", text)
    # drop other control characters (keep newlines and tabs, which whitespace handling deals with)
    text = drop_controls(text)
    if whitespace:
        lines = [_SPACES.sub(" ", l).strip() for l in text.split("\n")]
        text = "\n".join(l for l in lines if l)
    return text


def length_ok(text: str, min_chars: int, max_chars: Optional[int], stats: dict) -> bool:
    """Whether `text` is within [min_chars, max_chars]; counts too_short / too_long in `stats`."""
    if len(text) < max(min_chars, 1):
        stats["too_short"] += 1
        return False
    if max_chars is not None and len(text) > max_chars:
        stats["too_long"] += 1
        return False
    return True


def text_hash(text: str) -> int:
    """A 64-bit hash of a text (for dedupe: a few dozen bytes per distinct sample whatever its length)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def clean_all(texts: list[str], normalize: str = "nfc", whitespace: bool = True, min_chars: int = 1,
              max_chars: Optional[int] = None, dedupe: bool = False) -> tuple[list[str], dict]:
    """Clean every text; drop those outside [min_chars, max_chars] and (optionally) duplicates.

    Duplicates are found by a 64-bit hash of the cleaned text: a few dozen bytes per distinct sample
    whatever its length (a clash of two different texts has odds of about n^2 / 2^65)."""
    out, seen = [], set()
    stats = {"too_short": 0, "too_long": 0, "duplicates": 0}
    for t in texts:
        t = clean_text(t, normalize, whitespace)
        if not length_ok(t, min_chars, max_chars, stats):
            continue
        if dedupe:
            h = text_hash(t)
            if h in seen:
                stats["duplicates"] += 1
                continue
            seen.add(h)
        out.append(t)
    return out, stats
