"""Tokenize texts into a corpus cache entry: streamed, on several processes, with a progress bar.

The texts arrive from an iterator (a source read a line at a time, see `sources.iter_records`) and
are cut into chunks (CHUNK texts or CHUNK_CHARS characters, whichever comes first). Each chunk goes
to a worker process, which cleans it (the cleaning of `clean.py`; length filters), tokenizes the
kept texts and frames them (`[bos] text [eos]`, truncated or split at max_length), and sends back
one flat token array with the pieces' lengths, how many pieces each kept text gave, and the kept
texts' 64-bit hashes. The parent drops repeated hashes (`dedupe`: a set of 8-byte hashes, never the
texts) and appends the rest to the split's files in order. A few chunks per worker are in flight,
so memory holds a few chunks, never the corpus; the result does not depend on the number of
processes.

Without a validation source, the whole source is tokenized into one temporary split and then
divided by `split_indices` over its texts (so exactly as the in-memory path divides them), a block
of texts at a time from the memory map.

Rows with a loss mask (tasks chat and completion) take the same road through `encode_records`:
chunks of raw records go to the workers, which turn them into rows by the task's own function
(template, masking, fitting to max_length: the data layer knows nothing of chats) and send back
the ids, a uint8 mask (1 where the loss applies) and per-item counters; the parent writes the
ids to split NAME and the masks to split NAME.mask, row for row.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import sys
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np

from gpt2tune.data.cache import SplitWriter
from gpt2tune.data.clean import clean_text, length_ok, text_hash
from gpt2tune.data.dataset import frame

CHUNK = 2048  # texts per task
CHUNK_CHARS = 1 << 20  # and at most about this many characters (long documents make small chunks)
IN_FLIGHT = 4  # chunks queued per worker
_TOK = None  # the tokenizer, framing and cleaning, inherited by forked workers
_FRAME: tuple = ()
_CLEAN: Optional["Cleaning"] = None


@dataclass(frozen=True)
class Cleaning:
    """What a worker does to a raw text before tokenizing it (the data section's fields)."""

    normalize: str = "nfc"
    whitespace: bool = True
    min_chars: int = 1
    max_chars: Optional[int] = None
    dedupe: bool = False

    @classmethod
    def of(cls, data_cfg) -> "Cleaning":
        return cls(**{k: getattr(data_cfg, k) for k in cls.__dataclass_fields__})


@dataclass
class Chunk:
    """A worker's answer for one chunk of texts."""

    flat: np.ndarray  # the kept texts' pieces, end to end
    lengths: np.ndarray  # tokens per piece
    pieces: np.ndarray  # pieces per kept text (int32)
    hashes: Optional[np.ndarray]  # the kept texts' hashes (uint64), when deduplicating
    truncated: np.ndarray  # per kept text (bool)
    too_short: int
    too_long: int
    nbytes: int  # UTF-8 bytes of the raw texts


@dataclass
class Built:
    """One split as written: its meta (`SplitWriter.close`), pieces per text, truncated texts, and the
    cleaning counts of the texts it read."""

    meta: dict
    pieces: np.ndarray
    truncated: np.ndarray
    counts: dict = field(default_factory=lambda: {"too_short": 0, "too_long": 0, "duplicates": 0})


def _encode(texts: list[str]) -> Chunk:
    bos, eos, max_length, split_long, dtype = _FRAME
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    counts = {"too_short": 0, "too_long": 0}
    hashes = None
    if _CLEAN is not None:
        c = _CLEAN
        texts = [clean_text(t, c.normalize, c.whitespace) for t in texts]
        texts = [t for t in texts if length_ok(t, c.min_chars, c.max_chars, counts)]
        if c.dedupe:
            hashes = np.fromiter((text_hash(t) for t in texts), dtype=np.uint64, count=len(texts))
    enc = _TOK(texts) if texts else []
    flat, lengths, per_text, cut = frame_all(enc, bos, eos, max_length, split_long, dtype)
    return Chunk(flat, lengths, per_text, hashes, cut, counts["too_short"], counts["too_long"], nbytes)


def frame_all(enc: list[list[int]], bos: Optional[int], eos: Optional[int], max_length: int, split_long: bool,
              dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`frame` every text's ids: (the pieces end to end, their lengths, pieces per text, truncated per
    text). Texts that fit are framed in one vectorised pass (most of them: no Python loop over their
    tokens); the others go through `frame`."""
    n = len(enc)
    lens = np.fromiter(map(len, enc), dtype=np.int64, count=n)
    ids = np.fromiter(itertools.chain.from_iterable(enc), dtype=dtype, count=int(lens.sum()))
    start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=start[1:])
    head, tail = int(bos is not None), int(eos is not None)
    framed = lens + head + tail
    per_text, cut = np.ones(n, dtype=np.int32), np.zeros(n, dtype=bool)
    flats, lengths, a = [], [], 0
    for j in [*np.flatnonzero(framed > max_length).tolist(), n]:
        if j > a:  # texts a..j-1 fit: [bos] ids [eos] each
            fl = framed[a:j]
            out = np.empty(int(fl.sum()), dtype=dtype)
            ends = np.cumsum(fl)
            body = np.ones(len(out), dtype=bool)
            if head:
                out[ends - fl] = bos
                body[ends - fl] = False
            if tail:
                out[ends - 1] = eos
                body[ends - 1] = False
            out[body] = ids[start[a] : start[j]]
            flats.append(out)
            lengths.append(fl)
        if j < n:
            got, cut[j] = frame(enc[j] if isinstance(enc[j], list) else list(enc[j]), bos, eos, max_length, split_long)
            per_text[j] = len(got)
            flats.append(np.fromiter(itertools.chain.from_iterable(got), dtype=dtype))
            lengths.append(np.fromiter(map(len, got), dtype=np.int64, count=len(got)))
        a = j + 1
    if not flats:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64), per_text, cut
    return np.concatenate(flats), np.concatenate(lengths).astype(np.int64), per_text, cut


def _through_transformers(tok):
    # text is text: a literal `<|endoftext|>` or `[SEP]` in a sample is not the control token
    return lambda texts: tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def text_copy(tok):
    """A copy of `tok`'s Rust tokenizer (`tokenizers.Tokenizer`) that encodes special-token strings
    as text, without truncation or padding; None for tokenizers without one, or that it cannot copy
    (an old `tokenizers`, a tokenizer it cannot serialize)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        from tokenizers import Tokenizer

        rust = Tokenizer.from_str(backend.to_str())
        rust.encode_special_tokens = True
        rust.no_truncation()
        rust.no_padding()
        return rust
    except Exception:
        return None


def encoder(tok, probe: list[str]):
    """texts -> token ids, as `tok(texts, add_special_tokens=False, split_special_tokens=True)` gives them.

    A tokenizer backed by `tokenizers` is called directly: a copy of its Rust tokenizer that encodes
    special-token strings as text and skips offsets (`encode_batch_fast`), ~1.6x faster than the
    transformers call. It is used only when it gives the same ids on `probe` (e.g. the first chunk);
    else (and for Python tokenizers) the transformers call is."""
    slow = _through_transformers(tok)
    rust = text_copy(tok)
    if rust is None:
        return slow
    try:
        encode = getattr(rust, "encode_batch_fast", rust.encode_batch)
        fast = lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]  # noqa: E731
        if probe and fast(probe) != [list(x) for x in slow(probe)]:
            return slow
    except Exception:  # (an old `tokenizers`, a tokenizer it cannot serialize: the transformers call)
        return slow
    return fast


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def default_procs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _chunks(texts: Iterable[str]) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for t in texts:
        chunk.append(t)
        chars += len(t)
        if len(chunk) >= CHUNK or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _answers(pool, fn, chunks: Iterator, depth: int) -> Iterator:
    """fn(chunk) for every chunk, computed by the workers, in the order of the chunks, with at most
    `depth` chunks in flight."""
    if pool is None:
        yield from map(fn, chunks)
        return
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(fn, (chunk,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def tokenize_splits(tok, splits: dict[str, tuple[Iterable[str], int]], folder, bos: Optional[int],
                    eos: Optional[int], max_length: int, split_long: bool, dtype, cleaning: Optional[Cleaning] = None,
                    num_proc: Optional[int] = None, progress: bool = True) -> dict[str, Built]:
    """Write every split's framed token ids into `folder`. `splits` maps a name to (texts, bytes): the
    texts as an iterable (read as they are consumed) and the size the progress bar counts for them
    (e.g. the source files' sizes). With `cleaning`, workers clean and filter the texts first."""
    global _TOK, _FRAME, _CLEAN
    procs = _procs(num_proc)
    bar = _bar(sum(size for _, size in splits.values()), procs, progress)
    built: dict[str, Built] = {}
    first = {name: _chunks(texts) for name, (texts, _) in splits.items()}  # (read lazily; the first chunk now)
    heads = {name: next(it, []) for name, it in first.items()}
    _TOK = encoder(tok, next((h for h in heads.values() if h), [])[:256])
    _FRAME, _CLEAN = (bos, eos, max_length, split_long, dtype), cleaning
    try:
        with _workers(procs) as pool:  # (forked after the globals are set)
            for name, (_, size) in splits.items():
                texts = itertools.chain([heads[name]], first[name]) if heads[name] else iter(())
                w = SplitWriter(folder, name, dtype)
                seen: set[int] = set()
                pieces, truncated, counts = [], [], {"too_short": 0, "too_long": 0, "duplicates": 0}
                share = _Share(bar, size)
                for c in _answers(pool, _encode, texts, IN_FLIGHT * procs):
                    counts["too_short"] += c.too_short
                    counts["too_long"] += c.too_long
                    if c.hashes is not None:
                        c = _drop_repeats(c, seen, counts)
                    w.add(c.flat, c.lengths)
                    pieces.append(c.pieces)
                    truncated.append(c.truncated)
                    share.add(c.nbytes)
                share.finish()
                built[name] = Built(w.close(), _cat(pieces, np.int32), _cat(truncated, bool), counts)
    finally:
        _TOK, _CLEAN = None, None
        bar.close()
    return built


def _procs(num_proc: Optional[int]) -> int:
    if "fork" not in mp.get_all_start_methods():
        return 1  # workers inherit the tokenizer
    return num_proc or default_procs()


def _bar(total: int, procs: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=f"tokenizing ({procs} proc)",
                disable=not progress, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


@contextmanager
def _workers(procs: int):
    """A pool of `procs` forked workers (None: work in this process), closed on the way out."""
    pool = mp.get_context("fork").Pool(procs, initializer=_init_worker) if procs > 1 else None
    try:
        yield pool
    finally:
        if pool is not None:
            pool.close()
            pool.join()


class _Share:
    """One split's share of the progress bar: its chunks' bytes, never more than the split's size; the
    rest (newlines and markup the texts do not count) at the end."""

    def __init__(self, bar, size: int):
        self.bar, self.left = bar, size

    def add(self, nbytes: int) -> None:
        step = min(nbytes, max(self.left, 0))
        self.bar.update(step)
        self.left -= step

    def finish(self) -> None:
        self.bar.update(max(self.left, 0))
        self.left = 0


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _drop_repeats(c: Chunk, seen: set, counts: dict) -> Chunk:
    """The chunk without the texts whose hash was seen before (in it or in an earlier chunk)."""
    keep = np.ones(len(c.hashes), dtype=bool)
    for i, h in enumerate(c.hashes.tolist()):
        if h in seen:
            keep[i] = False
        else:
            seen.add(h)
    if keep.all():
        return c
    counts["duplicates"] += int((~keep).sum())
    piece_keep = np.repeat(keep, c.pieces)
    token_keep = np.repeat(piece_keep, c.lengths)
    return Chunk(c.flat[token_keep], c.lengths[piece_keep], c.pieces[keep], c.hashes[keep], c.truncated[keep],
                 c.too_short, c.too_long, c.nbytes)


BLOCK = 1 << 16  # texts copied at a time when dividing a split


def divide(folder, whole: str, pieces: np.ndarray, parts: dict[str, np.ndarray], dtype) -> dict[str, dict]:
    """Write split files `parts` (name -> sorted indices of texts) from split `whole` of `folder`, whose
    text i is `pieces[i]` consecutive documents; every part keeps the texts' order. Memory: one block of
    texts (read with plain reads, not a memory map, whose pages would count as the process's own)."""
    dtype = np.dtype(dtype)
    first = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(pieces, out=first[1:])  # the first document of each text
    offsets = np.fromfile(folder / f"{whole}.offsets.bin", dtype=np.int64)
    lengths = np.diff(offsets)
    metas = {}
    with open(folder / f"{whole}.tokens.bin", "rb") as f:
        for name, idx in parts.items():
            w = SplitWriter(folder, name, dtype)
            member = np.zeros(len(pieces), dtype=bool)
            member[idx] = True
            for a in range(0, len(pieces), BLOCK):
                b = min(a + BLOCK, len(pieces))
                if not member[a:b].any():
                    continue
                d0, d1 = first[a], first[b]
                doc_keep = np.repeat(member[a:b], pieces[a:b])
                f.seek(int(offsets[d0]) * dtype.itemsize)
                span = np.fromfile(f, dtype=dtype, count=int(offsets[d1] - offsets[d0]))
                w.add(span[np.repeat(doc_keep, lengths[d0:d1])], lengths[d0:d1][doc_keep])
            metas[name] = w.close()
    return metas


# --------------------------------------------------------------------------- rows with a loss mask

ROW_CHUNK = 256  # records per task (a chat record is encoded turn by turn: small tasks keep workers even)
_ROWS: dict = {}  # split name -> rows_of, inherited by forked workers


@dataclass
class RowsChunk:
    """A worker's answer for one chunk of records (see `encode_records`)."""

    ids: np.ndarray  # the rows end to end
    mask: np.ndarray  # uint8, 1 where the loss applies
    lengths: np.ndarray  # tokens per row
    pieces: np.ndarray  # rows per item, 0 or 1 (int32)
    stats: np.ndarray  # per item counters (int64, items x k)
    bad: int  # records that gave no item
    nbytes: int


@dataclass
class BuiltRows:
    """One split of rows as written: the metas of NAME and NAME.mask, rows per item, per item counters,
    records that gave no item."""

    metas: dict
    pieces: np.ndarray
    stats: np.ndarray
    bad: int


def record_bytes(r) -> int:
    """UTF-8 bytes of the strings in a record (what the progress bar counts of a record)."""
    if isinstance(r, str):
        return len(r.encode("utf-8"))
    if isinstance(r, dict):
        return sum(record_bytes(v) for v in r.values())
    if isinstance(r, (list, tuple)):
        return sum(record_bytes(v) for v in r)
    return 0


def _encode_rows(task: tuple) -> RowsChunk:
    name, records, first, dtype, k = task
    rows, stats, bad = _ROWS[name](records, first)
    kept = [r for r in rows if r is not None]
    lengths = np.fromiter((len(ids) for ids, _ in kept), dtype=np.int64, count=len(kept))
    ids = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in kept), dtype=dtype, count=int(lengths.sum()))
    mask = np.fromiter(itertools.chain.from_iterable(m for _, m in kept), dtype=np.uint8, count=int(lengths.sum()))
    pieces = np.fromiter((r is not None for r in rows), dtype=np.int32, count=len(rows))
    return RowsChunk(ids, mask, lengths, pieces, np.asarray(stats, dtype=np.int64).reshape(len(rows), k), bad,
                     sum(map(record_bytes, records)))


def _record_chunks(name: str, records: Iterable[dict], dtype, k: int) -> Iterator[tuple]:
    it = iter(records)
    first = True
    while chunk := list(itertools.islice(it, ROW_CHUNK)):
        yield name, chunk, first, dtype, k
        first = False


def encode_records(splits: dict[str, tuple], folder, dtype, k: int, num_proc: Optional[int] = None,
                   progress: bool = True) -> dict[str, BuiltRows]:
    """Write every split's rows and loss masks into `folder` (splits NAME and NAME.mask). `splits` maps a
    name to (records, bytes, rows_of): the records as an iterable read as it is consumed, the size the
    progress bar counts, and `rows_of(records, first) -> (rows, stats, bad)`, which turns a chunk of
    records (`first`: the source's first chunk) into its items' rows (`(ids, mask)`, or None for an item
    with nothing to train), one row of `k` counters per item, and how many records gave no item. The
    workers run `rows_of` (forked: it may hold a tokenizer); the parent writes in order."""
    procs = _procs(num_proc)
    bar = _bar(sum(size for _, size, _ in splits.values()), procs, progress)
    _ROWS.clear()
    _ROWS.update({name: rows_of for name, (_, _, rows_of) in splits.items()})
    built: dict[str, BuiltRows] = {}
    try:
        with _workers(procs) as pool:  # (forked after _ROWS is set)
            for name, (records, size, _) in splits.items():
                w, wm = SplitWriter(folder, name, dtype), SplitWriter(folder, f"{name}.mask", np.uint8)
                pieces, stats, bad = [], [], 0
                share = _Share(bar, size)
                for c in _answers(pool, _encode_rows, _record_chunks(name, records, dtype, k), IN_FLIGHT * procs):
                    w.add(c.ids, c.lengths)
                    wm.add(c.mask, c.lengths)
                    pieces.append(c.pieces)
                    stats.append(c.stats)
                    bad += c.bad
                    share.add(c.nbytes)
                share.finish()
                built[name] = BuiltRows({name: w.close(), f"{name}.mask": wm.close()}, _cat(pieces, np.int32),
                                        np.concatenate(stats) if stats else np.zeros((0, k), dtype=np.int64), bad)
    finally:
        _ROWS.clear()
        bar.close()
    return built
