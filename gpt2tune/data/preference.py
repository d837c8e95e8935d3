"""Preference pairs: a prompt, a chosen and a rejected response.

Two record forms are read (as TRL and UltraFeedback write them):

- text: `{"prompt": "...", "chosen": "...", "rejected": "..."}`: the responses continue the prompt;
- messages: `chosen` and `rejected` are lists of `{role, content}` messages. The prompt is their
  shared prefix (UltraFeedback: `[user, assistant]` each, `prompt` a string repeating the user turn),
  or `prompt` itself when it is a message list and the responses hold only the answers (TRL's
  explicit form).

A bad record (a missing or mistyped field) is an error naming file:line; a pair whose chosen and
rejected responses are equal is skipped and counted (nothing to prefer). `Pair` is a token row
pair for training and `collate_pairs` batches them: chosen rows first, then the rejected ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from gpt2tune.data.clean import clean_text
from gpt2tune.data.dataset import IGNORE, pad_rows
from gpt2tune.errors import UserError

ROLES = ("system", "user", "assistant")
ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "prompter": "user"}

Messages = list  # of {"role", "content"}


@dataclass
class PreferenceItem:
    """One cleaned record: text form (strings) or messages form (message lists)."""

    prompt: Union[str, Messages]
    chosen: Union[str, Messages]
    rejected: Union[str, Messages]

    @property
    def chat(self) -> bool:
        return isinstance(self.chosen, list)


def record_place(spec: str, index: int) -> str:
    """Where record `index` (0-based) of a source is: `file:line` for JSONL files (blank lines are
    skipped by the reader, as here), else `SPEC record N`."""
    kind, _, path = spec.partition(":")
    if kind == "jsonl" and Path(path).is_file():
        seen = -1
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            for line_no, line in enumerate(f.read().split("\n"), 1):
                if line.strip():
                    seen += 1
                    if seen == index:
                        return f"{path}:{line_no}"
    return f"{spec} record {index + 1}"


def _messages(raw, where: str, name: str, normalize: str, whitespace: bool) -> Messages:
    if not raw:
        raise UserError(f"{where}: '{name}' is an empty message list")
    out = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict):
            raise UserError(f"{where}: '{name}'[{j}] must be an object with 'role' and 'content'")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = ALIASES.get(role, role)
        if role not in ROLES or not isinstance(content, str):
            raise UserError(f"{where}: '{name}'[{j}] needs a role ({', '.join(ROLES)}) and a string content")
        out.append({"role": role, "content": clean_text(content, normalize, whitespace).strip()})
    return out


def item_of(record: dict, where: str, normalize: str = "nfc", whitespace: bool = False) -> PreferenceItem:
    """The pair in one record; UserError naming `where` when the record is malformed."""
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise UserError(f"{where}: no field '{missing[0]}' (a preference record has prompt, chosen and rejected; "
                        f"got {', '.join(map(str, record)) or 'nothing'})")
    c, r, p = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(c, str) and isinstance(r, str):
        if not isinstance(p, str):
            raise UserError(f"{where}: 'prompt' must be a string when chosen and rejected are strings"
                            + (" (it is missing)" if p is None else f" (got {type(p).__name__})"))
        # joined verbatim, prompt + response (as TRL does): whitespace at the seam is kept
        clean = lambda s: clean_text(s, normalize, False)  # noqa: E731
        return PreferenceItem(clean(p), clean(c), clean(r))
    if isinstance(c, list) and isinstance(r, list):
        chosen = _messages(c, where, "chosen", normalize, whitespace)
        rejected = _messages(r, where, "rejected", normalize, whitespace)
        if isinstance(p, list):  # explicit form: the prompt's messages, then the answers
            return PreferenceItem(_messages(p, where, "prompt", normalize, whitespace), chosen, rejected)
        if p is not None and not isinstance(p, str):
            raise UserError(f"{where}: 'prompt' must be a string or a message list (got {type(p).__name__})")
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        if k == 0 and p:  # no shared turn: the prompt string is the user's question
            return PreferenceItem([{"role": "user", "content": clean_text(p, normalize, whitespace).strip()}],
                                  chosen, rejected)
        if k == 0:
            raise UserError(f"{where}: chosen and rejected share no first message and there is no prompt")
        return PreferenceItem(chosen[:k], chosen[k:], rejected[k:])
    raise UserError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists "
                    f"(got {type(c).__name__} and {type(r).__name__})")


def items_of(records: list[dict], spec: str, normalize: str = "nfc", whitespace: bool = False
             ) -> tuple[list[PreferenceItem], int]:
    """The pairs of a source, and how many records were skipped (chosen equal to rejected, or
    nothing to train in them)."""
    out, skipped = [], 0
    for i, rec in enumerate(records):
        try:
            item = item_of(rec, "", normalize, whitespace)
        except UserError as err:
            raise UserError(record_place(spec, i) + str(err)) from None
        empty = (not item.chosen or not item.rejected) if not item.chat else \
            (not any(m["content"] for m in item.chosen) or not any(m["content"] for m in item.rejected))
        if item.chosen == item.rejected or empty:
            skipped += 1
            continue
        out.append(item)
    return out, skipped


def flat_text(x: Union[str, Messages]) -> str:
    """Plain text of a prompt or response (what a tokenizer built from the data learns from)."""
    return x if isinstance(x, str) else "\n".join(m["content"] for m in x)


# --------------------------------------------------------------------------- token rows


@dataclass
class Side:
    """One response with its prompt: token ids, and labels that are -100 outside the response."""

    ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class Pair:
    """A training pair; `ref` holds the reference model's summed response log-probs (chosen, rejected)
    when they were computed before training."""

    chosen: Side
    rejected: Side
    ref: Optional[tuple[float, float]] = None

    def __len__(self) -> int:  # batching groups pairs by their longer side
        return max(len(self.chosen), len(self.rejected))


def collate_pairs(rows: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of B pairs as 2B right-padded rows (chosen rows, then rejected rows).

    `response_labels` is -100 on prompts and padding; `labels` has one entry per pair (what the
    trainer counts to weight micro-batches); `ref_logps` (2B) when every pair carries its reference."""
    sides = [p.chosen for p in rows] + [p.rejected for p in rows]
    ids, mask = pad_rows([s.ids for s in sides], pad_id)
    labels, _ = pad_rows([s.labels for s in sides], IGNORE)
    batch = {"input_ids": ids, "attention_mask": mask, "response_labels": labels,
             "labels": torch.zeros(len(rows), dtype=torch.long)}  # label 0: the first of each pair is preferred
    if rows and all(p.ref is not None for p in rows):
        batch["ref_logps"] = torch.tensor([p.ref[0] for p in rows] + [p.ref[1] for p in rows], dtype=torch.float32)
    return batch
