"""The decoding-constraint interface: what `generate.decode.Decoder` and `generate.beam.beam_search`
ask of an object that limits which tokens each row may take next.

A constraint keeps one state per row of the active batch. The decoder calls `start` once with the
prompt each row continues, then at every step `allowed()` (a [rows, vocab] bool mask, applied after
the logits processors: where they left a row nothing, the constraint's own choice wins), samples,
and `advance(tokens)`; `reorder(index)` follows rows leaving the batch or beams being reordered.
`max_new_tokens` bounds the tokens it needs (the decoder budgets that many instead of
`Sampling.max_new_tokens`), and `prompt_ids(p)` gives the token ids prompt `p` is fed as (a
constraint may rewrite its prompts, as verse forms put punctuation back).

`generate.forms.FormConstraint` (classical verse forms: lines, rhyme, tones, acrostic) is the
built-in one; any object with these members works. Text generation (`generate.text`, the server)
takes a `ConstraintSpec`: a hashable description (requests with equal specs share a batch) that
builds the constraint for a batch of prompts; verse forms' is `generate.forms.FormSpec`. A built
constraint may also give `prefixes`, the text each prompt's output starts with (verse forms put
the prompt's punctuation back); else the prompts themselves.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class Constraint(Protocol):
    max_new_tokens: int

    def prompt_ids(self, p: int) -> list[int]:
        """The ids prompt `p` is decoded from (without the BOS token)."""

    def start(self, prompt_index: list[int]) -> None:
        """Begin one row per entry, row r continuing prompt `prompt_index[r]`."""

    def allowed(self) -> torch.Tensor:
        """[rows, vocab] bool: the tokens each row may take next."""

    def advance(self, tokens: torch.Tensor) -> None:
        """Each row took `tokens[row]`."""

    def reorder(self, index: Sequence[int]) -> None:
        """Keep rows `index`, in that order (finished rows leave; beams are reordered)."""


@runtime_checkable
class ConstraintSpec(Protocol):
    def build(self, tok, vocab_size: int, prompts: list[str], eos_id: Optional[int]) -> Constraint:
        """The constraint for `prompts` (text), over a model vocabulary of `vocab_size` ids."""
