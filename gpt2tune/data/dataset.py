"""Token datasets for causal language modelling, and the batches of an epoch.

A sample is framed `[bos] text [eos]` with the tokenizer's own markers (`[CLS] ... [SEP]`
for BERT-style Chinese vocabularies, `<|endoftext|>` for GPT-2 BPE). Batches are a pure
function of (seed, epoch), so a run can resume at any batch index.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from gpt2tune.data.cache import TokenStore

IGNORE = -100


@dataclass
class TokenData:
    train: list[list[int]]
    val: list[list[int]]
    stats: dict = field(default_factory=dict)


def frame(ids: list[int], bos: Optional[int], eos: Optional[int], max_length: int, split_long: bool) -> tuple[list[list[int]], bool]:
    """Frame one tokenised text; return the pieces and whether it was truncated."""
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    full = head + ids + tail
    if len(full) <= max_length:
        return [full], False
    if not split_long:
        return [full[:max_length]], True
    body = max_length - len(head)
    pieces = []
    rest = ids + tail
    while rest:
        pieces.append(head + rest[:body])
        rest = rest[body:]
    return pieces, False


def tokenize_texts(tokenizer, texts: list[str], bos: Optional[int], eos: Optional[int], max_length: int,
                   split_long: bool = False) -> tuple[list[list[int]], int]:
    if not texts:
        return [], 0
    # text is text: a literal `<|endoftext|>` or `[SEP]` in a sample is not the control token
    enc = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    out, truncated = [], 0
    for ids in enc:
        pieces, cut = frame(list(ids), bos, eos, max_length, split_long)
        out += pieces
        truncated += int(cut)
    return out, truncated


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return sorted(idx[n_val:]), sorted(idx[:n_val])


# --------------------------------------------------------------------------- batches


def lengths_of(seqs) -> np.ndarray:
    """The length of every row (int64): a store's (TokenStore, chat.masking.MaskedStore) from its
    offsets, or len() of each row of a list."""
    if isinstance(getattr(seqs, "lengths", None), np.ndarray):
        return seqs.lengths
    return np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))


def epoch_batches(seqs, batch_size: int, mode: str, seed: int, epoch: int, block: int) -> "EpochBatches":
    """The batches (lists of token rows) of one epoch, in order: a sequence built lazily, batch by
    batch, from `seqs` (a list of rows, or a memory-mapped TokenStore), so an epoch of a large corpus
    costs a few integers per document, never a copy of its tokens.

    pad:   shuffle, then consecutive samples (each batch padded to its longest)
    group: shuffle, sort by length inside windows of 64 batches, shuffle the batches
           (little padding, still random order)
    pack:  shuffle, concatenate, cut into rows of exactly `block` tokens (no padding); each row is
           a `Packed` that knows where its documents start, so that `collate` gives every document its
           own causal attention, positions from 0 and no label across a boundary

    The plan is a pure function of (seed, epoch) and the rows' lengths: the same for a list and for a
    TokenStore of the same rows. A stream (`data.stream.RowStream`, which has its own `epoch_batches`)
    gives its packed rows in the order it reads them: one endless epoch.
    """
    own = getattr(seqs, "epoch_batches", None)
    if own is not None:
        return own(batch_size, seed, epoch)
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(seqs)))
    rng.shuffle(order)
    order = np.asarray(order, dtype=np.int64)
    if mode == "pack":
        return _PackedBatches(seqs, order, batch_size, block)
    if mode == "group":
        lengths = lengths_of(seqs)
        window = batch_size * 64
        parts, bounds = [], [0]
        for w in range(0, len(order), window):
            chunk = order[w : w + window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]  # = sorted(chunk, key=len): stable
            parts.append(chunk)
            bounds += [w + min(i + batch_size, len(chunk)) for i in range(0, len(chunk), batch_size)]
        flat = np.concatenate(parts) if parts else order
        which = list(range(len(bounds) - 1))
        rng.shuffle(which)  # the permutation shuffling the list of batches would apply
        return _IndexBatches(seqs, flat, np.asarray(bounds, dtype=np.int64), np.asarray(which, dtype=np.int64))
    bounds = np.asarray([*range(0, len(order), batch_size), len(order)], dtype=np.int64)
    return _IndexBatches(seqs, order, bounds, np.arange(len(bounds) - 1, dtype=np.int64))


class EpochBatches:
    """A read-only sequence of batches; batch k is built when asked for."""

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, k: int) -> list:
        raise NotImplementedError

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self.batch(j) for j in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self.batch(k)

    def __iter__(self):
        return (self.batch(k) for k in range(len(self)))

    def __eq__(self, other):  # equal to the list of the same batches
        if isinstance(other, (EpochBatches, list)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None


class _IndexBatches(EpochBatches):
    """Batch k is the rows flat[bounds[which[k]] : bounds[which[k] + 1]]."""

    def __init__(self, seqs, flat, bounds, which):
        self.seqs, self.flat, self.bounds, self.which = seqs, flat, bounds, which

    def __len__(self) -> int:
        return len(self.which)

    def batch(self, k: int) -> list:
        g = int(self.which[k])
        return [self.seqs[int(i)] for i in self.flat[self.bounds[g] : self.bounds[g + 1]]]


class _PackedBatches(EpochBatches):
    """The documents in `order` laid end to end and cut every `block` tokens; rows of one token
    (a last row's lone token predicts nothing) are left out."""

    def __init__(self, seqs, order, batch_size, block):
        self.seqs, self.order, self.bs, self.block = seqs, order, batch_size, block
        lengths = lengths_of(seqs)[order]
        self.starts = np.zeros(len(order) + 1, dtype=np.int64)  # where each document begins in the stream
        np.cumsum(lengths, out=self.starts[1:])
        total = int(self.starts[-1])
        self.n_rows = -(-total // block)
        if self.n_rows and total - (self.n_rows - 1) * block <= 1:
            self.n_rows -= 1

    def __len__(self) -> int:
        return -(-self.n_rows // self.bs)

    def row(self, r: int) -> "Packed":
        a, b = r * self.block, (r + 1) * self.block
        st = self.starts
        k0 = int(np.searchsorted(st, a, side="right")) - 1  # the document holding token a
        k1 = int(np.searchsorted(st, b, side="left"))  # the first document starting at or after b
        k1 = min(k1, len(self.order))
        store = self.seqs if isinstance(self.seqs, TokenStore) else None
        ids: list[int] = []
        for j in range(max(k0, 0), k1):
            lo, hi = max(a, int(st[j])) - int(st[j]), min(b, int(st[j + 1])) - int(st[j])
            if hi <= lo:
                continue
            doc = int(self.order[j])
            ids += store.ids(doc)[lo:hi].tolist() if store is not None else list(self.seqs[doc][lo:hi])
        # a row that begins inside a document starts a fragment of it: offset 0 is a start too
        inside = st[max(k0, 0) : k1]
        starts = sorted({0, *(int(s) - a for s in inside if s >= a)})
        return Packed(ids, starts)

    def batch(self, k: int) -> list:
        return [self.row(r) for r in range(k * self.bs, min((k + 1) * self.bs, self.n_rows))]


class Packed(list):
    """A packed row: token ids, plus `starts`, the offsets where its documents begin."""

    def __init__(self, ids, starts):
        super().__init__(ids)
        self.starts = list(starts)


def pad_rows(rows: list, pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token rows padded to the longest, on the right or the left (the one
    padding helper of training, classification and generation)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, sl] = torch.tensor(list(r), dtype=torch.long)
            mask[i, sl] = 1
    return ids, mask


def collate(rows: list[list[int]], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad rows to the longest; padding gets attention 0 and label -100 (never in the loss).

    Packed rows also get `position_ids` that restart at 0 with every document (the segment of
    padding at the end of a short last row included): the model then attends within each document
    only (Hugging Face builds that block-diagonal causal mask from the positions when the batch has
    no `attention_mask` for it, see `model_inputs`; `train.fast` does the same) and the first token of
    a document is never a label of the one before it."""
    ids, mask = pad_rows(rows, pad_id, left)
    width = ids.size(1)
    labels = ids.masked_fill(mask == 0, IGNORE)
    if rows and isinstance(rows[0], Packed):
        pos = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            bounds = [*r.starts, len(r)] + ([width] if len(r) < width else [])
            for a, b in zip(bounds, bounds[1:]):
                pos[i, a:b] = torch.arange(b - a)
                if a > 0:
                    labels[i, a] = IGNORE  # the previous document's last token does not predict this one
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": pos}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def model_inputs(batch: dict) -> dict:
    """What a Hugging Face forward takes from a batch: packed batches pass their per-document
    positions and no 2D mask (from which HF would build one causal mask across documents)."""
    if "position_ids" in batch:  # (HF looks for packing only without a KV cache)
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size
