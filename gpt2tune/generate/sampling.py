"""Decoding with a KV cache: greedy, or sampling with temperature / top-k / top-p.

Special tokens other than the end marker are never generated; a sequence ends at the
end marker (`<|endoftext|>` or `[SEP]`) or after `max_new_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
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


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[int], eos_id: Optional[int], s: Sampling,
                 suppress_ids: Iterable[int] = ()) -> list[list[int]]:
    """Continue one prompt `num_return_sequences` times; return only the new ids (eos excluded)."""
    device = next(model.parameters()).device
    n = s.num_return_sequences
    n_pos = getattr(model.config, "n_positions", None) or 1024
    if not prompt_ids:
        raise ValueError("empty prompt: start with the tokenizer's begin marker")
    budget = min(s.max_new_tokens, n_pos - len(prompt_ids))
    if budget <= 0:
        raise ValueError(f"the prompt ({len(prompt_ids)} tokens) fills the model's context of {n_pos}")
    gen = torch.Generator(device="cpu")
    if s.seed is not None:
        gen.manual_seed(s.seed)
    else:
        gen.seed()
    suppress = torch.tensor(sorted(set(suppress_ids) - {eos_id}), dtype=torch.long, device=device)

    was_training = model.training
    model.eval()
    inp = torch.tensor([prompt_ids] * n, dtype=torch.long, device=device)
    past = None
    out_ids = torch.empty((n, 0), dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for _ in range(budget):
        out = model(input_ids=inp, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1, :].float()
        if suppress.numel():
            logits[:, suppress] = float("-inf")
        if s.greedy:
            nxt = logits.argmax(-1)
        else:
            probs = filter_logits(logits, s.temperature, s.top_k, s.top_p).softmax(-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(device)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        out_ids = torch.cat([out_ids, nxt[:, None]], dim=1)
        inp = nxt[:, None]
        if bool(done.all()):
            break
    model.train(was_training)
    result = []
    for row in out_ids.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        result.append(row)
    return result
