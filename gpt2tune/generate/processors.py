"""Logits processors of the decoding loop, with per-row state that follows beam reordering.

Applied in this order to the next-token logits: suppressed ids (special tokens other than the
end marker, ids the tokenizer does not have), minimum length (no end marker before
`min_new_tokens`), repetition penalty (CTRL-style: divide positive logits of already seen tokens
by the penalty, multiply negative ones), no-repeat-n-gram (ban a token that would repeat an
n-gram of the prompt or of the text so far). Pad positions of left-padded prompts do not count.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from gpt2tune.generate.sampling import Sampling

NEG_INF = float("-inf")


class Processors:
    def __init__(self, s: Sampling, prompts: list[list[int]], vocab: int, eos_id: Optional[int],
                 suppress_ids: Iterable[int], device, penalties: Optional[list[float]] = None):
        self.s = s
        self.eos = eos_id
        ban = sorted({i for i in suppress_ids if 0 <= i < vocab} - {eos_id})
        self.banned = torch.zeros(vocab, dtype=torch.bool, device=device)
        if ban:
            self.banned[torch.tensor(ban, device=device)] = True
        self.any_banned = bool(ban)
        self.seen = None
        self.penalty = s.repetition_penalty  # a float, or a [B, 1] tensor of per-row penalties
        if penalties is not None:
            self.penalty = torch.tensor(penalties, dtype=torch.float32, device=device)[:, None]
        if any(p != 1.0 for p in penalties) if penalties is not None else s.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
            for r, p in enumerate(prompts):
                if p:
                    self.seen[r, torch.tensor(p, device=device)] = True
        self.hist = None
        if s.no_repeat_ngram_size > 0:
            n = s.no_repeat_ngram_size
            self.hist = [list(p) for p in prompts]
            self.ngrams = []
            for p in prompts:
                d: dict = {}
                for i in range(len(p) - n + 1):
                    d.setdefault(tuple(p[i:i + n - 1]), set()).add(p[i + n - 1])
                self.ngrams.append(d)

    def active(self, step: int) -> bool:
        """Whether `__call__` changes anything before the token at `step`."""
        return self.any_banned or (self.eos is not None and step < self.s.min_new_tokens) or self.seen is not None \
            or self.hist is not None

    def only_bans(self, step: int):
        """Whether `__call__` before the token at `step` only bans tokens, the same for every row
        (suppressed ids, the end marker before `min_new_tokens`): then the [V] bool mask of them, or
        None when it bans nothing; False when it changes values or bans per row (repetition penalty,
        no-repeat-n-gram)."""
        if self.seen is not None or self.hist is not None:
            return False
        eos = self.eos is not None and step < self.s.min_new_tokens
        if not eos:
            return self.banned if self.any_banned else None
        mask = self.banned.clone()
        mask[self.eos] = True
        return mask

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Process logits [B, V] (in place where possible) before the new token at `step` (0-based)."""
        if self.any_banned:
            logits.masked_fill_(self.banned, NEG_INF)
        if self.eos is not None and step < self.s.min_new_tokens:
            logits[:, self.eos] = NEG_INF
        if self.seen is not None:
            p = self.penalty
            logits = torch.where(self.seen, torch.where(logits < 0, logits * p, logits / p), logits)
        if self.hist is not None:
            n = self.s.no_repeat_ngram_size
            for r, h in enumerate(self.hist):
                if len(h) >= n - 1:
                    bad = self.ngrams[r].get(tuple(h[len(h) - n + 1:]) if n > 1 else ())
                    if bad:
                        logits[r, list(bad)] = NEG_INF
        return logits

    def advance(self, tokens: torch.Tensor, token_list: list[int]) -> None:
        if self.seen is not None:
            self.seen[torch.arange(len(token_list), device=tokens.device), tokens] = True
        if self.hist is not None:
            n = self.s.no_repeat_ngram_size
            for r, t in enumerate(token_list):
                h = self.hist[r]
                h.append(t)
                if len(h) >= n:
                    self.ngrams[r].setdefault(tuple(h[len(h) - n:len(h) - 1]), set()).add(t)

    def reorder(self, index: list[int]) -> None:
        if torch.is_tensor(self.penalty):
            self.penalty = self.penalty[torch.tensor(index, device=self.penalty.device)]
        if self.seen is not None:
            self.seen = self.seen[torch.tensor(index, device=self.seen.device)]
        if self.hist is not None:
            self.hist = [list(self.hist[i]) for i in index]
            self.ngrams = [{k: set(v) for k, v in self.ngrams[i].items()} for i in index]


def constrain(logits: torch.Tensor, raw: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
    """Apply a constraint's allowed-token mask; where processors left a row nothing, fall back
    to the constraint alone (the constraint always wins)."""
    if allowed is not None:
        allowed = allowed.to(logits.device)
        logits = logits.masked_fill(~allowed, NEG_INF)
    dead = logits.amax(-1) == NEG_INF
    if bool(dead.any()):
        fallback = raw if allowed is None else raw.masked_fill(~allowed, NEG_INF)
        logits = torch.where(dead[:, None], fallback, logits)
    return logits
