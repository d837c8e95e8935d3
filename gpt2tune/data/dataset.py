"""Token datasets for causal language modelling, and the batches of an epoch.

A sample is framed `[bos] text [eos]` with the tokenizer's own markers (`[CLS] ... [SEP]`
for BERT-style Chinese vocabularies, `<|endoftext|>` for GPT-2 BPE). Batches are a pure
function of (seed, epoch), so a run can resume at any batch index.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

import torch

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


def epoch_batches(seqs: list[list[int]], batch_size: int, mode: str, seed: int, epoch: int,
                  block: int) -> list[list[list[int]]]:
    """The batches (lists of token rows) of one epoch, in order.

    pad:   shuffle, then consecutive samples (each batch padded to its longest)
    group: shuffle, sort by length inside windows of 64 batches, shuffle the batches
           (little padding, still random order)
    pack:  shuffle, concatenate, cut into rows of exactly `block` tokens (no padding); each row is
           a `Packed` that knows where its documents start, so that `collate` gives every document its
           own causal attention, positions from 0 and no label across a boundary
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(seqs)))
    rng.shuffle(order)
    if mode == "pack":
        stream: list[int] = []
        starts: list[int] = []  # offsets in the stream where a document begins
        for i in order:
            starts.append(len(stream))
            stream += seqs[i]
        rows, k = [], 0
        for a in range(0, len(stream), block):
            while k < len(starts) and starts[k] < a:
                k += 1
            j = k
            while j < len(starts) and starts[j] < a + block:
                j += 1
            # a row that begins inside a document starts a fragment of it: offset 0 is a start too
            rows.append(Packed(stream[a : a + block], sorted({0, *(s - a for s in starts[k:j])})))
            k = j
        rows = [r for r in rows if len(r) > 1]
        return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    if mode == "group":
        window = batch_size * 64
        grouped = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda i: len(seqs[i]))
            grouped += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(grouped)
        return [[seqs[i] for i in b] for b in grouped]
    return [[seqs[i] for i in order[b : b + batch_size]] for b in range(0, len(order), batch_size)]


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
