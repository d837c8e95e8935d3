"""Decoding options (`Sampling`) and the logits filter of sampling: temperature, top-k, top-p
(`filter_candidates`, per-row settings, used by every sampler).

`generate_ids` continues one prompt; `decode.decode` is the batched engine behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

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


NEG_INF = float("-inf")


def _per_row(value, rows: int, dtype, device) -> torch.Tensor:
    if torch.is_tensor(value):
        return value.to(device=device, dtype=dtype)
    return torch.full((rows,), value, dtype=dtype, device=device)


def _cutoff(srt: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """[B, 1]: the smallest logit each row keeps, from its logits sorted in descending order (all of
    them, or at least its k best and one more)."""
    C = srt.size(-1)
    n = k.clamp(max=C)
    thr = srt.gather(1, (n - 1)[:, None])
    if bool((p < 1).any()):
        asc = srt.masked_fill(srt < thr, NEG_INF).flip(-1)  # transformers' TopP, after top-k
        cum = asc.softmax(-1).cumsum(-1)
        drop = (cum <= (1 - p).to(cum.dtype)[:, None]).sum(-1).clamp(max=C - 1)  # the best token always stays
        n = torch.minimum(n, torch.where(p < 1, C - drop, C))
        thr = srt.gather(1, (n - 1)[:, None])
    return thr


def filter_candidates(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Temperature, then top-k, then top-p over next-token logits [B, V]: the one implementation
    behind every sampler. Each setting is a number or a [B] tensor (one per row, as the server
    batches requests with different settings); top_k 0 (or >= V) and top_p 1 switch a filter off
    for that row.

    Rules (those of `transformers`' TopK and TopP warpers): top-k keeps the tokens whose logit is
    at least the k-th largest; top-p then drops, from the least likely up, the tokens whose
    cumulative probability (renormalised over what top-k kept) is <= 1 - top_p, never the most
    likely one. Ties: a token whose logit equals the smallest kept logit is kept too, so equal
    logits are never split (top-k 2 over logits [3, 1, 1] keeps three tokens) and the result does
    not depend on how a sort orders equal values.

    Returns (vals, idx): removed tokens are -inf in `vals`. When the filters needed a sort (every
    row has a top-k, or some row a top-p), `vals` holds each row's best candidates only (sorted,
    as many as the widest row keeps) and `idx` their token ids, so a draw costs that many rather
    than V; otherwise `idx` is None and `vals` is [B, V] in vocabulary order."""
    B, V = logits.shape
    dev = logits.device
    t = _per_row(temperature, B, torch.float32, dev)
    x = logits if bool((t == 1).all()) else logits / t[:, None]
    k = _per_row(top_k, B, torch.long, dev)
    k = torch.where((k > 0) & (k < V), k, V)
    p = _per_row(top_p, B, torch.float64, dev)
    use_k, use_p = k < V, p < 1
    if not bool(use_k.any()) and not bool(use_p.any()):
        return x, None
    idx = None
    if bool(use_k.all()):
        C = min(V, int(k.max()) + 1)  # one more than needed: shows a tie across the cut
        srt, idx = torch.topk(x, C, dim=-1)
        if C < V and bool(((srt[:, -1] == srt[:, -2]) & (srt[:, -1] > NEG_INF)).any()):
            # a tie runs past the candidates (common with bf16 logits): take every token at least
            # as large as each row's k-th, not a sort of the whole vocabulary (10 ms for 8 rows)
            kth = srt.gather(1, (k.clamp(max=C) - 1)[:, None])
            width = int((x >= kth).sum(-1).max())
            srt, idx = torch.topk(x, width, dim=-1) if width < V else torch.sort(x, descending=True, dim=-1)
    elif bool(use_p.any()):
        srt, idx = torch.sort(x, descending=True, dim=-1)
    else:
        srt = torch.topk(x, int(k[use_k].max()), dim=-1).values
    thr = torch.where((use_k | use_p)[:, None], _cutoff(srt, k, p), NEG_INF)
    if idx is not None:
        width = int((srt >= thr).sum(-1).max())  # kept tokens are a prefix of each sorted row
        return srt[:, :width].masked_fill(srt[:, :width] < thr, NEG_INF), idx[:, :width]
    return x.masked_fill(x < thr, NEG_INF), None


def filter_logits(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0) -> torch.Tensor:
    """`filter_candidates` as [B, V] logits in vocabulary order (removed tokens: -inf)."""
    vals, idx = filter_candidates(logits, temperature, top_k, top_p)
    if idx is None:
        return vals
    return torch.full(logits.shape, NEG_INF, dtype=vals.dtype, device=vals.device).scatter(-1, idx, vals)
