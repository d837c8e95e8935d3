"""Chinese classical poems: the chinese-poetry JSON format and verse forms."""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Optional

from gpt2tune.errors import UserError

# form name -> (lines, characters per line)
FORMS = {
    "wuyan-jueju": (4, 5),
    "qiyan-jueju": (4, 7),
    "wuyan-lvshi": (8, 5),
    "qiyan-lvshi": (8, 7),
}

_CLAUSE_END = re.compile(r"[，。？！；、,.?!;：:]")


def is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x2EBEF
            or 0xF900 <= o <= 0xFAFF or 0x2F800 <= o <= 0x2FA1F)


def clauses(body: str) -> list[str]:
    return [c for c in _CLAUSE_END.split(body) if c.strip()]


def matches_form(body: str, form: str) -> bool:
    rows, cols = FORMS[form]
    cs = clauses(body)
    return len(cs) == rows and all(len(c) == cols and all(is_cjk(ch) for ch in c) for c in cs)


def find_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(x for x in p.iterdir() if x.suffix == ".json")
    elif any(ch in path for ch in "*?["):
        files = [Path(x) for x in sorted(glob.glob(path))]
    else:
        files = [p]
    if not files:
        raise UserError(f"no chinese-poetry JSON files at {path}")
    for f in files:
        if not f.exists():
            raise UserError(f"data file not found: {f}")
    return files


def _to_simplified(text: str) -> str:
    import zhconv

    return zhconv.convert(text, "zh-cn")


def records_from_items(items: list, include_title: bool, form: Optional[str], simplified: bool) -> tuple[list[dict], int]:
    """Turn chinese-poetry items into {"text", "title", "author"} records; count the malformed ones."""
    out, skipped = [], 0
    for it in items:
        if not isinstance(it, dict):
            skipped += 1
            continue
        paras = it.get("paragraphs")
        if not isinstance(paras, list) or not paras or not all(isinstance(x, str) for x in paras):
            skipped += 1
            continue
        body = "".join(x.strip() for x in paras)
        if not body:
            skipped += 1
            continue
        if form is not None and not matches_form(body, form):
            continue  # filtered, not malformed
        title = it.get("title") if isinstance(it.get("title"), str) else ""
        text = f"{title}：{body}" if include_title and title else body
        if simplified:
            text = _to_simplified(text)
        out.append({"text": text, "title": title, "author": it.get("author") if isinstance(it.get("author"), str) else ""})
    return out, skipped
