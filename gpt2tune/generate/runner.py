"""Incremental forward passes over a KV cache for the decoding loops.

A runner owns the cache of one batch: `prefill` runs the (left-padded) prompts and returns the
next-token logits of every row; `step` feeds one token per row; `select` keeps/reorders rows
(finished rows dropped, beams reordered). Position ids count only real tokens, so a left-padded
row sees exactly the positions it would see alone.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch


class HFRunner:
    """Runs a `transformers` causal LM with its DynamicCache; last-position logits only."""

    def __init__(self, model):
        self.model = model
        self.past = None
        self.mask = None
        self.pos = None

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = mask.long().cumsum(-1) - 1
        pos.masked_fill_(mask == 0, 1)
        padded = not bool(mask.all())
        self.mask = mask if padded else None
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1)
        self.past = out.past_key_values
        self.pos = pos[:, -1:] + 1
        return out.logits[:, -1, :].float()

    def step(self, tokens: torch.Tensor, top1_only: bool = False, banned: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The next-token logits after `tokens`; all of them, whatever `top1_only` and `banned` (see
        `FastRunner.step`)."""
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.size(0), 1)], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.pos,
                         past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        self.pos = self.pos + 1
        return out.logits[:, -1, :].float()

    def select(self, index: torch.Tensor) -> None:
        self.past.reorder_cache(index)
        if self.mask is not None:
            self.mask = self.mask[index]
        self.pos = self.pos[index]


def make_runner(model, max_len: Optional[int] = None, kind: str = "auto", weights: str = "model"):
    """The fastest runner for `model`: `generate.fast.FastRunner` (static cache, `weights` format)
    for plain GPT-2 LMs, else `transformers`' own forward (`kind="hf"` forces it). Reduced-precision
    `weights` apply only to the fast runner; other models decode with their own weights (a warning says so)."""
    from gpt2tune.generate.fast import FastRunner, fast_supported

    why = "the hf runner was asked for" if kind == "hf" else fast_supported(model)
    if why is None:
        return FastRunner(model, weights, max_len)
    if weights != "model":
        _warn_once(f"weights={weights} needs the fast GPT-2 runner ({why}); decoding with the model's own weights")
    return HFRunner(model)


_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)
