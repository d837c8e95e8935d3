"""The rows of a decode: prompts in (left-padded, within the model's context) and results out.
Shared by the sampling engine (`generate.decode`) and beam search (`generate.beam`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from gpt2tune.data.dataset import pad_rows


@dataclass
class Result:
    prompt_index: int
    ids: list[int] = field(default_factory=list)  # new ids, end marker excluded
    finish: str = "length"  # "eos", "length" or "stop"
    score: Optional[float] = None  # beam search: length-normalised log-probability


def context_size(model) -> int:
    return getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None) or 1024


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_rows(rows, pad_id, left=True)
    return ids.to(device), mask.to(device)
