"""The corpus cache: a data source tokenized once, kept on disk, memory-mapped by every run.

An entry is a folder named by a key: the hash of the source's content (every file's size, mtime and
content hash), the tokenizer (its own fingerprint), and every data setting that changes the tokens
(cleaning, split, max_length, framing). It holds, for the `train` and `val` splits,

  SPLIT.tokens.bin    every document's token ids back to back (uint16 when the vocabulary has fewer
                      than 65,536 entries, else uint32), read through `numpy.memmap`
  SPLIT.offsets.bin   int64, one more than documents: document i is tokens[offsets[i]:offsets[i+1]]
  SPLIT.mask.*        (tasks chat and completion) uint8 loss masks, row for row: 1 where trained
  meta.json           format, dtype, counts, byte sizes and content hashes of the files above, the
                      `data.json` statistics of the source; written last

An entry is built in a temporary folder and renamed into place, so a reader sees a whole entry or
none; one whose sizes or hashes do not match its meta.json is reported and rebuilt, never read.
Nothing is pickled: raw arrays and JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np

from gpt2tune.errors import UserError

FORMAT = 1
SPLITS = ("train", "val")


class CacheCorrupt(Exception):
    """An entry whose files do not match its meta.json (truncated, edited, half-written)."""


def default_root() -> Path:
    env = os.environ.get("GPT2TUNE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gpt2tune" / "data"


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 2**16 else np.uint32


# --------------------------------------------------------------------------- fingerprints


def _hash_file(path: Path, h=None) -> str:
    h = h or hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "blake2b": _hash_file(path)}


def tokenizer_fingerprint(tok) -> str:
    """What decides the ids a tokenizer gives: its class, its whole definition (the fast tokenizer's
    JSON, else the vocabulary and merges) and the ids of a probe text."""
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode())
        ranks = getattr(tok, "bpe_ranks", None)
        if ranks:
            h.update(json.dumps(sorted(f"{a} {b} {r}" for (a, b), r in ranks.items()), ensure_ascii=False).encode())
    probe = "白日依山盡 Every effort moves you. [SEP] <|endoftext|> 123 ÄÖ"
    h.update(json.dumps(list(tok(probe, add_special_tokens=False, split_special_tokens=True)["input_ids"])).encode())
    h.update(str(len(tok)).encode())
    return h.hexdigest()


# the code that turns a source into tokens: an entry built by other code is not reused
PIPELINE = ("sources.py", "poetry.py", "clean.py", "dataset.py", "corpus.py", "cache.py")


def code_fingerprint() -> str:
    h = hashlib.sha256()
    for name in PIPELINE:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def entry_key(parts: dict) -> str:
    blob = json.dumps({"format": FORMAT, "code": code_fingerprint(), **parts}, sort_keys=True, ensure_ascii=False,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- reading


class TokenStore:
    """Documents of token ids in one flat array (a memory map, or any array) cut by offsets.

    `store[i]` is document i as a list of ints (what batching and collation take); `ids(i)` the
    array slice. Only `offsets` (8 bytes a document) is read into memory; tokens stay on disk."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
        self.tokens = tokens
        self.offsets = offsets
        self.lengths = np.diff(offsets)

    @classmethod
    def from_lists(cls, seqs: list[list[int]], dtype=np.uint32) -> "TokenStore":
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for s in seqs for t in s), dtype=dtype, count=int(offsets[-1]))
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __bool__(self) -> bool:
        return len(self) > 0

    def ids(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.ids(int(i)).tolist()

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1] - self.offsets[0])

    @property
    def max_len(self) -> int:
        return int(self.lengths.max()) if len(self) else 0

    def span(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the documents laid end to end in their stored order."""
        return self.tokens[self.offsets[0] + start : self.offsets[0] + stop]


def _memmap(path: Path, dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def open_split(folder: Path, split: str, m: dict, dtype, verify: bool = True) -> TokenStore:
    """One split's store, as its meta `m` (`SplitWriter.close`) describes it; CacheCorrupt when the
    files do not match it."""
    dtype = np.dtype(dtype)
    tpath, opath = folder / f"{split}.tokens.bin", folder / f"{split}.offsets.bin"
    for path, size in ((tpath, m["tokens"] * dtype.itemsize), (opath, (m["documents"] + 1) * 8)):
        if not path.is_file() or path.stat().st_size != size:
            have = path.stat().st_size if path.is_file() else "missing"
            raise CacheCorrupt(f"{path.name}: {have} bytes, {size} expected")
        if verify and _hash_file(path) != m["blake2b"][path.name]:
            raise CacheCorrupt(f"{path.name}: content hash differs from meta.json")
    offsets = np.fromfile(opath, dtype=np.int64)
    if offsets[0] != 0 or offsets[-1] != m["tokens"] or (len(offsets) > 1 and np.any(np.diff(offsets) < 0)):
        raise CacheCorrupt(f"{opath.name}: offsets do not describe {m['tokens']} tokens")
    return TokenStore(_memmap(tpath, dtype, m["tokens"]), offsets)


def open_entry(folder: Path, verify: bool = True) -> tuple[dict, dict[str, TokenStore]]:
    """meta.json and the stores of an entry; CacheCorrupt when anything does not match."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CacheCorrupt(f"meta.json unreadable ({type(err).__name__})") from None
    if meta.get("format") != FORMAT:
        raise CacheCorrupt(f"format {meta.get('format')} is not {FORMAT}")
    dtype = np.dtype(meta["dtype"])
    splits = meta.get("splits") or {}
    if any(s not in splits for s in SPLITS):
        raise CacheCorrupt(f"meta.json lists splits {', '.join(splits) or 'none'}, not {' and '.join(SPLITS)}")
    stores = {split: open_split(folder, split, m, np.uint8 if split.endswith(".mask") else dtype, verify)
              for split, m in splits.items()}
    return meta, stores


# --------------------------------------------------------------------------- writing


class SplitWriter:
    """Appends documents (token arrays) to SPLIT.tokens.bin; offsets written at the end."""

    def __init__(self, folder: Path, split: str, dtype):
        self.folder, self.split, self.dtype = folder, split, np.dtype(dtype)
        self.f = open(folder / f"{split}.tokens.bin", "wb")
        self.lengths: list[np.ndarray] = []
        self.n_tokens = 0

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Documents laid end to end in `flat`, with their `lengths`."""
        self.f.write(np.ascontiguousarray(flat, dtype=self.dtype).tobytes())
        self.lengths.append(np.asarray(lengths, dtype=np.int64))
        self.n_tokens += int(len(flat))

    def add_lists(self, seqs: Iterable[list[int]]) -> None:
        seqs = list(seqs)
        if seqs:
            self.add(np.fromiter((t for s in seqs for t in s), dtype=self.dtype),
                     np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs)))

    def close(self) -> dict:
        self.f.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        opath = self.folder / f"{self.split}.offsets.bin"
        offsets.tofile(opath)
        tname = f"{self.split}.tokens.bin"
        return {"documents": int(len(lengths)), "tokens": self.n_tokens,
                "max_length": int(lengths.max()) if len(lengths) else 0,
                "blake2b": {tname: _hash_file(self.folder / tname), opath.name: _hash_file(opath)}}


def new_entry(root: Path) -> Path:
    """A temporary folder to build an entry in (renamed into place by `commit`)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"data cache folder {root} cannot be created: {err.strerror}") from None
    tmp = root / f".tmp-{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir()
    return tmp


def commit(tmp: Path, folder: Path, meta: dict) -> Path:
    """Write meta.json last and move the finished entry into place (another process that finished
    the same entry first wins; ours is dropped)."""
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=1, ensure_ascii=False), encoding="utf-8")
    try:
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "meta.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def discard(folder: Path) -> None:
    """Remove a corrupt entry (renamed away first, so no reader sees half of it)."""
    gone = folder.with_name(f".gone-{folder.name}-{os.getpid()}")
    try:
        os.rename(folder, gone)
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)
