"""Streaming sources (`data.streaming: true`): for a corpus that does not fit on disk or in memory.

The source is read through `datasets`' streaming mode, record by record (`hf:NAME[:SPLIT]`, a hub id
or a local dataset folder; `jsonl:PATH` and `text:PATH`, a file or a glob, through datasets' `json`
and `text` builders). Nothing is cached and nothing is held whole: each document is cleaned (the
cleaning of `clean.py`), tokenized and framed (`frame`, as every causal-lm sample) as it arrives, and
the documents are laid end to end and cut into rows of exactly `max_length` tokens (the `pack` layout,
each row a `Packed` that knows where its documents start). Rows are shuffled in windows: a window of
`shuffle_buffer` rows is filled, permuted by a seeded RNG and handed out, then the next one is filled.

Why windows and not `IterableDataset.shuffle(seed, buffer_size)`: datasets' state_dict does not hold
its shuffle buffer (loading one logs "without the buffer content ... refilled") and its RNG starts
again, so a resumed run would lose the buffered documents and see another order. A window is a pure
function of where it starts in the source (datasets' `state_dict()` before the record of the
document holding its first token, and the token offset in that document) and of (seed, window
number): the checkpoint records that position and how many of the window's rows were used
(`RowStream.state_dict()`, JSON), and a resume reads that one window again, so the rows that follow
are exactly those of an uninterrupted run, at the cost of re-reading at most one window.

When the source ends, a new pass begins from its start (after the held-out validation documents) and
the row being cut goes on with its first document; `train.max_steps` says how long to train.
`dedupe` drops a document whose cleaned text already occurred in the same window (a set of 64-bit
hashes, emptied at every window and every pass), `limit` ends a pass after that many training
documents.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from gpt2tune.data import sources
from gpt2tune.data.clean import clean_text, length_ok, text_hash
from gpt2tune.data.dataset import EpochBatches, Packed, frame
from gpt2tune.errors import UserError

KINDS = ("hf", "jsonl", "text")
FORMAT = 1
CHUNK = 256  # documents tokenized in one call


@dataclass
class StreamSettings:
    """What decides the rows of a stream (the data section's fields of the same names)."""

    source: str
    field: str = "text"
    text_mode: str = "auto"
    normalize: str = "nfc"
    whitespace: bool = True
    min_chars: int = 1
    max_chars: Optional[int] = None
    dedupe: bool = False
    limit: Optional[int] = None
    max_length: int = 128  # tokens per row
    long_samples: str = "truncate"
    shuffle_buffer: int = 10000  # rows per window
    val_documents: int = 1000
    validation: Optional[str] = None

    @classmethod
    def of(cls, data_cfg) -> "StreamSettings":
        """From a recipe's data section (or any object with these attributes)."""
        return cls(**{k: getattr(data_cfg, k) for k in cls.__dataclass_fields__})


def _datasets():
    try:
        import datasets  # type: ignore
    except ImportError:
        raise UserError("data.streaming reads sources through the `datasets` package: pip install 'gpt2tune[hf]'") from None
    return datasets


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def open_source(spec: str, text_mode: str = "auto"):
    """A fresh `datasets.IterableDataset` over the source's records (in the source's order)."""
    kind, rest = sources.split_spec(spec)
    if kind not in KINDS:
        raise UserError(f"data.streaming reads hf:, jsonl: and text: sources, not {kind}: ({spec})")
    datasets = _datasets()
    if kind in ("jsonl", "text") and not any(c in rest for c in "*?[") and not Path(rest).is_file():
        raise UserError(f"data file not found: {rest}" if not Path(rest).is_dir() else f"expected a file, got a folder: {rest}")
    try:
        if kind == "hf":
            name, _, split = rest.partition(":")
            if not name:
                raise UserError("hf: needs a dataset id or folder, e.g. hf:HuggingFaceFW/fineweb:train")
            return datasets.load_dataset(name, split=split or "train", streaming=True)
        if kind == "jsonl":
            return datasets.load_dataset("json", data_files=rest, split="train", streaming=True)
        by = "paragraph" if text_mode == "documents" else "line"
        return datasets.load_dataset("text", data_files=rest, split="train", streaming=True, sample_by=by)
    except UserError:
        raise
    except Exception as err:  # offline, unknown name, private, unknown split, no file matches ...
        if type(err).__name__ == "DatasetNotFoundError":
            raise UserError(f"Hugging Face dataset {rest.partition(':')[0]!r} does not exist or cannot be accessed: "
                            "check the id; a private or gated dataset needs HF_TOKEN set to a token that can read it") from None
        raise UserError(f"could not open {spec} for streaming: {_first_line(err)}") from None


@dataclass
class Doc:
    """A cleaned document: where its record starts in the source, a hash of its text, its framed
    pieces' tokens end to end and where each piece starts."""

    state: dict
    hash: int
    ids: np.ndarray
    starts: list
    truncated: bool


class Reader:
    """The documents of a source from a position on (datasets' state_dict, None: the beginning):
    records read one by one, cleaned, tokenized CHUNK at a time and framed."""

    def __init__(self, st: StreamSettings, spec: str, tok, bos, eos, state: Optional[dict], stats: dict):
        self.st, self.spec, self.tok, self.bos, self.eos, self.stats = st, spec, tok, bos, eos, stats
        self.ds = open_source(spec, st.text_mode)
        if state is not None:
            self.ds.load_state_dict(state)
        self.it = iter(self.ds)
        self.first = state  # (datasets' state_dict() gives the loaded state only once its iterator has started)
        self.queue: deque = deque()
        self.done = False
        self.is_text = sources.split_spec(spec)[0] == "text"

    def _text(self, rec: dict) -> Optional[str]:
        if self.st.field not in rec:
            if not self.stats.get("documents_read"):  # the first record: the field is not in this source
                raise UserError(f"{self.spec}: no field/column {self.st.field!r}; available: {', '.join(map(str, rec))}")
            self.stats["skipped_records"] += 1
            return None
        v = rec[self.st.field]
        if isinstance(v, str):
            return v
        if v is not None and not isinstance(v, (list, dict)):
            return str(v)
        self.stats["skipped_records"] += 1
        return None

    def _records(self) -> list[tuple[dict, str]]:
        """The next CHUNK cleaned texts that pass the length filters, each with the state before it."""
        out = []
        while len(out) < CHUNK and not self.done:
            state = self.first if self.first is not None else self.ds.state_dict()
            self.first = None
            try:
                rec = next(self.it)
            except StopIteration:
                self.done = True
                break
            except Exception as err:  # network, broken JSON line, not UTF-8 ...
                raise UserError(f"reading {self.spec} failed: {_first_line(err)}") from None
            text = self._text(rec)
            if text is None:
                continue
            if self.is_text and not text.strip():
                continue  # a blank line of a text: file is no sample (as the text: reader)
            self.stats["documents_read"] += 1
            text = clean_text(text, self.st.normalize, self.st.whitespace)
            if length_ok(text, self.st.min_chars, self.st.max_chars, self.stats):
                out.append((state, text))
        return out

    def next(self) -> Optional[Doc]:
        if not self.queue:
            recs = self._records()
            if not recs:
                return None
            # text is text: a literal `<|endoftext|>` or `[SEP]` in a sample is not the control token
            enc = self.tok([t for _, t in recs], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            split = self.st.long_samples == "split"
            for (state, text), ids in zip(recs, enc):
                pieces, cut = frame(list(ids), self.bos, self.eos, self.st.max_length, split)
                starts = np.cumsum([0] + [len(p) for p in pieces[:-1]]).tolist()
                flat = np.fromiter((t for p in pieces for t in p), dtype=np.int64)
                self.queue.append(Doc(state, text_hash(text), flat, starts, cut))
        return self.queue.popleft()

    def position(self) -> Optional[dict]:
        """The state before the next document (None when the source has no more)."""
        if not self.queue:
            doc = self.next()
            if doc is None:
                return None
            self.queue.appendleft(doc)
        return self.queue[0].state


def new_stats() -> dict:
    return {"documents_read": 0, "too_short": 0, "too_long": 0, "skipped_records": 0, "duplicates": 0,
            "truncated": 0, "documents": 0, "rows": 0, "passes": 1, "documents_per_pass": None}


def read_validation(st: StreamSettings, tok, bos, eos) -> tuple[list[list[int]], Optional[dict], dict]:
    """The validation rows: the first `val_documents` documents of `validation`, else of the stream
    (then held out: training passes start after them), each framed alone (no packing); the source
    state where training starts (None: the beginning), and the counts."""
    stats = new_stats()
    n = st.val_documents
    if n == 0:
        return [], None, stats
    spec = st.validation or st.source
    reader = Reader(st, spec, tok, bos, eos, None, stats)
    rows = []
    for _ in range(n):
        doc = reader.next()
        if doc is None:
            break
        stats["documents"] += 1
        stats["truncated"] += int(doc.truncated)
        bounds = [*doc.starts, len(doc.ids)]
        rows += [doc.ids[a:b].tolist() for a, b in zip(bounds, bounds[1:])]
    if not rows:
        raise UserError(f"{spec}: no usable validation documents (after cleaning: {stats})")
    if st.validation:
        return rows, None, stats
    start = reader.position()
    if start is None:
        raise UserError(f"{spec}: the stream holds only {stats['documents']} usable documents, all held out for "
                        f"validation (data.val_documents {n}); lower it or set data.validation")
    return rows, start, stats


class RowStream:
    """The training rows of a stream, one after the other, pass after pass, never ending: every row
    exactly `max_length` tokens (a row that the source's end cuts goes on with the next pass' first
    document).

    `epoch_batches` gives the Trainer its batches (read in order, `batch_size` rows each);
    `state_dict()` / `load_state_dict()` save and restore the position (JSON)."""

    streaming = True

    def __init__(self, st: StreamSettings, tok, bos, eos, start: Optional[dict] = None, seed: int = 0,
                 log: Optional[Callable[[str], None]] = None, tokenizer_id: str = ""):
        self.st, self.tok, self.bos, self.eos = st, tok, bos, eos
        self.start = start  # the source state every pass starts from (after the held-out validation documents)
        self.seed = seed
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.tokenizer_id = tokenizer_id
        self.stats = new_stats()
        # the position: the window (counted from 0 over the whole stream), where it starts (None: at the
        # very beginning), how many of its rows were handed out
        self.window, self.at, self.taken = 0, None, 0
        self.batch = 0  # batches handed out
        self.rows = 0  # rows handed out
        # reading
        self._reader: Optional[Reader] = None
        self._pass = 0  # of the document being read
        self._cur: Optional[list] = None  # [Doc, offset]: the document being cut into rows
        self._docs = 0  # training documents of this pass so far (the current one included)
        self._seen: set = set()  # dedupe: hashes of this window's (and pass') documents
        self._win: Optional[tuple] = None  # (ids, starts, order) of the filled window

    def __bool__(self) -> bool:
        return True

    # -- position -------------------------------------------------------------
    def fingerprint(self) -> str:
        blob = json.dumps({"settings": asdict(self.st), "seed": self.seed, "tokenizer": self.tokenizer_id,
                           "framing": [self.bos, self.eos]}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return {"format": FORMAT, "fingerprint": self.fingerprint(), "window": self.window, "at": self.at,
                "taken": self.taken, "batch": self.batch, "rows": self.rows}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not state or state.get("format") != FORMAT:
            raise UserError("--resume: the checkpoint has no stream position (was it made with data.streaming?)")
        if state["fingerprint"] != self.fingerprint():
            raise UserError("--resume: the checkpoint's stream was read with other data settings, tokenizer or "
                            "seed; resume with the same recipe")
        self.window, self.at, self.taken = state["window"], state["at"], state["taken"]
        self.batch, self.rows = state["batch"], state["rows"]
        self._reader, self._win = None, None  # the window is read again from `at` when a row is asked for

    # -- reading --------------------------------------------------------------
    def _open(self) -> None:
        """Read from `self.at` (where this window starts), or from the very beginning."""
        at = self.at
        self._reader = Reader(self.st, self.st.source, self.tok, self.bos, self.eos,
                              at["source"] if at else self.start, self.stats)
        self._pass, self._cur, self._docs = 0, None, 0
        if at is not None:
            doc = self._reader.next()
            if doc is None or doc.hash != at["hash"]:
                raise UserError(f"--resume: {self.st.source} has changed since the checkpoint (the document where "
                                "the stream stopped is not there)")
            self._pass, self._cur, self._docs = at["pass"], [doc, at["offset"]], at["docs"]
            self.stats["passes"] = max(self.stats["passes"], self._pass + 1)

    def _next_doc(self) -> Doc:
        """The next training document; at the end of a pass (the source's end, or `limit` documents)
        the first of the next pass."""
        while True:
            doc = None if (self.st.limit and self._docs >= self.st.limit) else self._reader.next()
            if doc is None:
                if self._docs == 0:
                    raise UserError(f"{self.st.source}: no training documents in the stream (after cleaning: "
                                    f"{ {k: self.stats[k] for k in ('too_short', 'too_long', 'skipped_records')} })")
                self._pass += 1
                self.stats["passes"] = max(self.stats["passes"], self._pass + 1)
                self.stats["documents_per_pass"] = self._docs
                self.log(f"data: pass {self._pass + 1} over {self.st.source} begins (pass {self._pass} held "
                         f"{self._docs:,} training documents)")
                self._reader = Reader(self.st, self.st.source, self.tok, self.bos, self.eos, self.start, self.stats)
                self._docs, self._seen = 0, set()
                continue
            if self.st.dedupe:
                if doc.hash in self._seen:
                    self.stats["duplicates"] += 1
                    continue
                self._seen.add(doc.hash)
            self._docs += 1
            self.stats["documents"] += 1
            self.stats["truncated"] += int(doc.truncated)
            return doc

    def _row(self, out: np.ndarray) -> list:
        """Cut the next row into `out` (all of it); where its documents start."""
        block, n, starts = len(out), 0, [0]
        while n < block:
            if self._cur is None or self._cur[1] >= len(self._cur[0].ids):
                self._cur = [self._next_doc(), 0]
            doc, off = self._cur
            take = min(block - n, len(doc.ids) - off)
            out[n : n + take] = doc.ids[off : off + take]
            starts += [n + s - off for s in doc.starts if off <= s < off + take and n + s - off > 0]
            self._cur[1] += take
            n += take
        return starts

    def _fill(self) -> None:
        """Read window `self.window` (from `self.at`, where the reading is) and shuffle it."""
        if self._reader is None:
            self._open()
        cur = self._cur
        self._seen = {cur[0].hash} if (cur is not None and self.st.dedupe) else set()
        size = self.st.shuffle_buffer
        ids = np.zeros((size, self.st.max_length), dtype=np.uint32)
        starts = [self._row(ids[i]) for i in range(size)]
        order = list(range(size))
        random.Random(f"stream:{self.seed}:{self.window}").shuffle(order)
        self._win = (ids, starts, order)

    def next_row(self) -> Packed:
        if self._win is None:  # the first row, or the first after load_state_dict
            self._fill()
        if self.taken >= self.st.shuffle_buffer:  # the window is used up: the next one starts where reading is
            doc, off = self._cur
            self.window += 1
            self.at = {"pass": self._pass, "source": doc.state, "offset": off, "docs": self._docs, "hash": doc.hash}
            self.taken = 0
            self._fill()
        ids, starts, order = self._win
        i = order[self.taken]
        self.taken += 1
        self.rows += 1
        self.stats["rows"] += 1
        return Packed(ids[i].tolist(), starts[i])

    def epoch_batches(self, batch_size: int, seed: int, epoch: int) -> "StreamBatches":
        """The Trainer's batches: one endless epoch (epoch 0); `seed` (train.seed) seeds the windows
        (the same as the one given at construction, which a saved position's fingerprint holds)."""
        if epoch != 0:
            raise RuntimeError("a stream is one endless epoch")
        self.seed = seed
        return StreamBatches(self, batch_size)


class StreamBatches(EpochBatches):
    """Batches of a RowStream, read in order: batch k is rows k*batch_size ... of the stream."""

    def __init__(self, stream: RowStream, batch_size: int):
        self.stream, self.bs = stream, batch_size
        self._last: tuple = (None, None)

    def __len__(self) -> int:
        return sys.maxsize  # unknown: train.max_steps ends training

    def batch(self, k: int) -> list:
        if k == self._last[0]:
            return self._last[1]
        if k != self.stream.batch:
            raise RuntimeError(f"stream batches are read in order: batch {k} asked, {self.stream.batch} is next")
        rows = [self.stream.next_row() for _ in range(self.bs)]
        self.stream.batch += 1
        self._last = (k, rows)
        return rows


def head_texts(spec: str, field_name: str, n: int, text_mode: str = "auto") -> tuple[list[str], int]:
    """The text field of the first `n` records of a source, streamed (`data inspect --streaming N`);
    (texts, records skipped for a missing or non-text field)."""
    st = StreamSettings(spec, field=field_name, text_mode=text_mode)
    stats = new_stats()
    reader = Reader(st, spec, None, None, None, None, stats)
    texts = []
    for rec in reader.it:
        text = reader._text(rec)
        if text is not None and not (reader.is_text and not text.strip()):
            stats["documents_read"] += 1
            texts.append(text)
        if len(texts) + stats["skipped_records"] >= n:
            break
    return texts, stats["skipped_records"]

