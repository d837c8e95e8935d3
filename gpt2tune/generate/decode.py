"""The batched decoding engine: greedy or sampling over a KV cache, one step at a time.

`Decoder` continues many prompts at once (left-padded, `num_return_sequences` copies of each,
prompt-major like `transformers`). Iterating it yields one `Event` per step with the token of
every unfinished row, which is what streaming needs; `decode` runs it to the end. Finished rows
leave the batch, so a long tail costs only its own rows. A `constraint`
(`generate.constraints.Constraint`; verse forms: `generate.forms`) may restrict which tokens each
row can take next; `finish(row, reason)` ends a row from outside (stop strings are matched on text
by the caller).

Beam search lives in `generate.beam` and shares the runner, processors and rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

from gpt2tune.generate.beam import beam_search
from gpt2tune.generate.constraints import Constraint
from gpt2tune.generate.processors import Processors, constrain
from gpt2tune.generate.rows import Result, context_size, left_pad
from gpt2tune.generate.runner import make_runner
from gpt2tune.generate.sampling import Sampling, filter_candidates
from gpt2tune.generate.threads import small


@dataclass
class Event:
    rows: list[int]  # result indices that got a token at this step
    tokens: list[int]
    finished: list[int]  # result indices that finished at this step (their token is the end marker or last one)


def make_generator(seed: Optional[int]) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    return gen


class RowSampling:
    """Each row's sampling settings as [B] tensors that follow the rows as they leave the batch:
    greedy, temperature, top-k, top-p (and the repetition penalties, for `Processors`). The server
    batches requests with different settings together; a plain decode has one `Sampling` for all.
    Greedy rows filter as top-k 1 (their draw is replaced by the argmax)."""

    def __init__(self, settings: list[Sampling], device):
        g = [x.greedy for x in settings]
        self.greedy = torch.tensor(g, dtype=torch.bool, device=device)
        self.temperature = torch.tensor([1.0 if gr else x.temperature for gr, x in zip(g, settings)],
                                        dtype=torch.float32, device=device)
        self.top_k = torch.tensor([1 if gr else x.top_k for gr, x in zip(g, settings)], dtype=torch.long, device=device)
        self.top_p = torch.tensor([1.0 if gr else x.top_p for gr, x in zip(g, settings)], dtype=torch.float64,
                                  device=device)
        self.penalty = [x.repetition_penalty for x in settings]

    def select(self, index: torch.Tensor) -> None:
        self.greedy, self.temperature = self.greedy[index], self.temperature[index]
        self.top_k, self.top_p = self.top_k[index], self.top_p[index]


def pick(logits: torch.Tensor, rs: RowSampling, gen: torch.Generator) -> torch.Tensor:
    """The next token of every row: the argmax for greedy rows; for the others one draw after that
    row's temperature, top-k and top-p (`sampling.filter_candidates`; with a top-k on every row
    the draw is among the candidates only, a fraction of the cost for large vocabularies)."""
    if bool(rs.greedy.all()):
        return logits.argmax(-1)
    vals, idx = filter_candidates(logits, rs.temperature, rs.top_k, rs.top_p)
    choice = torch.multinomial(vals.softmax(-1).cpu(), 1, generator=gen).to(logits.device)
    drawn = (choice if idx is None else idx.gather(-1, choice)).squeeze(-1)
    return torch.where(rs.greedy, logits.argmax(-1), drawn) if bool(rs.greedy.any()) else drawn


class Decoder:
    def __init__(self, model, prompts: list[list[int]], eos_id: Optional[int], s: Sampling,
                 suppress_ids: Iterable[int] = (), constraint: Optional[Constraint] = None, pad_id: Optional[int] = None, runner="auto",
                 per_row: Optional[list[Sampling]] = None):
        """`per_row`: one `Sampling` per row (after `num_return_sequences` copies) whose greedy,
        temperature, top_k, top_p and repetition_penalty replace `s`'s for that row."""
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token (start with the begin marker)")
        msg = s.check()
        if msg:
            raise ValueError(msg)
        self.model, self.s, self.eos, self.constraint = model, s, eos_id, constraint
        self.device = next(model.parameters()).device
        n = s.num_return_sequences
        self.rows = [list(p) for p in prompts for _ in range(n)]
        self.results = [Result(prompt_index=i // n) for i in range(len(self.rows))]
        width = max(len(r) for r in self.rows)
        room = context_size(model) - width
        want = constraint.max_new_tokens if constraint is not None else s.max_new_tokens
        if room <= 0:
            raise ValueError(f"the prompt ({width} tokens) fills the model's context of {context_size(model)}")
        if constraint is not None and want > room:
            raise ValueError(f"the form needs {want} more tokens but the model's context leaves {room}")
        self.budget = min(want, room)
        self.pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.suppress = list(suppress_ids)
        self.runner_kind = runner if isinstance(runner, str) or runner is None else None
        self.runner = None if self.runner_kind is not None or runner is None else runner
        self.width = width
        if constraint is not None:
            constraint.start([r.prompt_index for r in self.results])
        self.active = list(range(len(self.rows)))  # result index of each batch position
        self.step_no = 0
        self.tokens = 0
        self._stopped: dict[int, str] = {}
        self.gen = make_generator(s.seed)
        if per_row is not None and len(per_row) != len(self.rows):
            raise ValueError(f"per_row has {len(per_row)} settings for {len(self.rows)} rows")
        self.per_row = per_row is not None
        self.row_sampling = RowSampling(per_row if per_row is not None else [s] * len(self.rows), self.device)

    def finish(self, row: int, reason: str = "stop") -> None:
        """End result `row` before its next step (e.g. a stop string was found in its text)."""
        if row in self.active:
            self._stopped[row] = reason

    def __iter__(self) -> Iterator[Event]:
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self._prefill()
            while self.active and self.step_no < self.budget:
                event, logits = self._step(logits)
                yield event
        finally:
            self.model.train(was_training)
        for r in self.active:
            self.results[r].finish = self._stopped.get(r, "length")
        self.active = []

    @torch.inference_mode()
    def _prefill(self) -> torch.Tensor:
        ids, mask = left_pad(self.rows, self.pad, self.device)
        if self.runner is None:
            self.runner = make_runner(self.model, self.width + self.budget, self.runner_kind or "auto", self.s.weights)
        logits = self.runner.prefill(ids, mask)
        self.proc = Processors(self.s, self.rows, logits.size(-1), self.eos, self.suppress, self.device,
                               self.row_sampling.penalty if self.per_row else None)
        return logits

    def _drop(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.runner.select(index)
        self.proc.reorder(keep)
        self.row_sampling.select(index)
        if self.constraint is not None:
            self.constraint.reorder(keep)

    @torch.inference_mode()
    def _step(self, logits: torch.Tensor):
        if self._stopped:
            keep = [i for i, r in enumerate(self.active) if r not in self._stopped]
            for r in self.active:
                if r in self._stopped:
                    self.results[r].finish = self._stopped[r]
            self._stopped.clear()
            if len(keep) < len(self.active):
                self.active = [self.active[i] for i in keep]
                if not keep:
                    return Event([], [], []), logits
                self._drop(keep)
                logits = logits[torch.tensor(keep, device=self.device)]
        raw = logits
        with small(logits):  # a few rows' logits: one thread (see generate.threads)
            if self.proc.active(self.step_no):
                logits = self.proc(logits.clone(), self.step_no)
            allowed = self.constraint.allowed() if self.constraint is not None else None
            if allowed is not None or logits is not raw:
                logits = constrain(logits, raw, allowed)
            nxt = pick(logits, self.row_sampling, self.gen)
            toks = nxt.tolist()
        self.step_no += 1
        self.tokens += len(toks)
        rows = list(self.active)
        finished, keep = [], []
        for i, (r, t) in enumerate(zip(rows, toks)):
            if t == self.eos:
                self.results[r].finish = "eos"
                finished.append(r)
            else:
                self.results[r].ids.append(t)
                keep.append(i)
        event = Event(rows, toks, finished)
        if self.step_no >= self.budget:
            self.active = [rows[i] for i in keep]
            return event, logits
        self.proc.advance(nxt, toks)
        if self.constraint is not None:
            self.constraint.advance(nxt)
        if len(keep) < len(rows):
            self.active = [rows[i] for i in keep]
            if not keep:
                return event, logits
            self._drop(keep)
            nxt = nxt[torch.tensor(keep, device=self.device)]
        if self.constraint is None and bool(self.row_sampling.greedy.all()):
            bans = self.proc.only_bans(self.step_no)
            if bans is not False:  # the next logits serve only their argmax, after these bans
                return event, self.runner.step(nxt, top1_only=True, banned=bans)
        return event, self.runner.step(nxt)


def decode(model, prompts: list[list[int]], eos_id: Optional[int], s: Sampling, suppress_ids: Iterable[int] = (),
           constraint: Optional[Constraint] = None, pad_id: Optional[int] = None, runner: str = "auto") -> list[Result]:
    """Continue every prompt `num_return_sequences` times (beam search when `s.num_beams` > 1).

    `runner`: "auto" (static-cache GPT-2 forward where supported, `generate.fast`) or "hf"
    (`transformers`' forward). `s.weights` picks the fast runner's weight format."""
    if s.num_beams > 1:
        return beam_search(model, prompts, eos_id, s, suppress_ids, constraint, pad_id, runner)
    dec = Decoder(model, prompts, eos_id, s, suppress_ids, constraint, pad_id, runner)
    for _ in dec:
        pass
    return dec.results


def generate_ids(model, prompt_ids: list[int], eos_id: Optional[int], s: Sampling,
                 suppress_ids: Iterable[int] = (), runner: str = "auto") -> list[list[int]]:
    """Continue one prompt `num_return_sequences` times; return only the new ids (eos excluded)."""
    if not prompt_ids:
        raise ValueError("empty prompt: start with the tokenizer's begin marker")
    res = decode(model, [prompt_ids], eos_id, s, suppress_ids=suppress_ids, runner=runner)
    return [r.ids for r in res]
