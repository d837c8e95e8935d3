"""Decoding options (`Sampling`) and the logits filters of sampling: temperature, top-k, top-p.

`generate_ids` continues one prompt; `decode.decode` is the batched engine behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch


@dataclass
class Sampling:
    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_return_sequences: int = 1
    seed: Optional[int] = None
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    weights: str = "model"  # decoding weights: "model" (exact), "bf16" or "int8" (generate.fast)

    def check(self) -> Optional[str]:
        """A message saying what is wrong with these options, or None."""
        if self.max_new_tokens < 1 or self.num_return_sequences < 1:
            return "max_new_tokens and num_return_sequences must be at least 1"
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            return "min_new_tokens must be between 0 and max_new_tokens"
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            return "temperature must be > 0, top_p in (0, 1] and top_k >= 0"
        if self.repetition_penalty <= 0:
            return "repetition_penalty must be > 0 (1.0: off)"
        if self.no_repeat_ngram_size < 0:
            return "no_repeat_ngram_size must be >= 0 (0: off)"
        if self.num_beams < 1:
            return "num_beams must be at least 1"
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            return "beam search returns at most num_beams sequences per prompt"
        if any(not s for s in self.stop):
            return "stop strings must not be empty"
        if self.weights not in ("model", "bf16", "int8"):
            return "weights must be model, bf16 or int8"
        return None


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    if temperature != 1.0:
        logits = logits / max(temperature, 1e-6)
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        remove = cum - probs > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def generate_ids(model, prompt_ids: list[int], eos_id: Optional[int], s: Sampling,
                 suppress_ids: Iterable[int] = (), runner: str = "auto") -> list[list[int]]:
    """Continue one prompt `num_return_sequences` times; return only the new ids (eos excluded)."""
    from gpt2tune.generate.decode import decode

    if not prompt_ids:
        raise ValueError("empty prompt: start with the tokenizer's begin marker")
    res = decode(model, [prompt_ids], eos_id, s, suppress_ids=suppress_ids, runner=runner)
    return [r.ids for r in res]
