"""Tokenize texts into a corpus cache entry: in chunks, on several processes, with a progress bar.

Each chunk of texts is sent to a worker process (a few chunks per worker in flight), encoded and
framed there (`[bos] text [eos]`, truncated or split at max_length) and comes back as one flat token
array plus the documents' lengths, which the parent appends to the entry's files in order: memory
holds a few chunks, never the corpus' token lists, the workers never touch (and so never copy) the
parent's texts, and the result does not depend on the number of processes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from typing import Optional

import numpy as np

from gpt2tune.data.cache import SplitWriter
from gpt2tune.data.dataset import frame

CHUNK = 2048  # texts per task

IN_FLIGHT = 4  # chunks queued per worker
_TOK = None  # the tokenizer and framing, inherited by forked workers
_FRAME: tuple = ()


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int, int]:
    bos, eos, max_length, split_long, dtype = _FRAME
    # text is text: a literal `<|endoftext|>` or `[SEP]` in a sample is not the control token
    enc = _TOK(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []
    pieces, truncated = [], 0
    for ids in enc:
        got, cut = frame(list(ids), bos, eos, max_length, split_long)
        pieces += got
        truncated += int(cut)
    flat = np.fromiter((t for p in pieces for t in p), dtype=dtype)
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    return flat, lengths, truncated, sum(len(t.encode("utf-8")) for t in texts)


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def default_procs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def tokenize_splits(tok, splits: dict[str, list[str]], folder, bos: Optional[int], eos: Optional[int],
                    max_length: int, split_long: bool, dtype, num_proc: Optional[int] = None,
                    progress: bool = True) -> tuple[dict, int]:
    """Write every split's framed token ids into `folder`; (per-split meta, truncated samples)."""
    global _TOK, _FRAME
    from tqdm.auto import tqdm

    procs = num_proc or default_procs()
    if "fork" not in mp.get_all_start_methods():
        procs = 1  # workers inherit the tokenizer
    total = sum(len(t.encode("utf-8")) for texts in splits.values() for t in texts)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=f"tokenizing ({procs} proc)",
               disable=not progress, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    metas, truncated = {}, 0
    _TOK, _FRAME = tok, (bos, eos, max_length, split_long, dtype)
    pool = mp.get_context("fork").Pool(procs, initializer=_init_worker) if procs > 1 else None  # (after the globals)
    try:
        for name, texts in splits.items():
            w = SplitWriter(folder, name, dtype)
            window = CHUNK * IN_FLIGHT * procs  # texts sent at once: memory for chunks stays bounded
            for a in range(0, len(texts), window):
                chunks = [texts[i : min(i + CHUNK, a + window, len(texts))]
                          for i in range(a, min(a + window, len(texts)), CHUNK)]
                results = pool.imap(_encode, chunks) if pool is not None else map(_encode, chunks)
                for flat, lengths, cut, nbytes in results:
                    w.add(flat, lengths)
                    truncated += cut
                    bar.update(nbytes)
            metas[name] = w.close()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        _TOK = None
        bar.close()
    return metas, truncated
