"""Text in, text out: frame prompts like training samples, decode many at once, stream, stop strings.

- `generate_texts` continues a list of prompts (batched, left-padded) and returns `Sample`s.
- `stream_texts` does the same as an iterator of events: first `{"type": "start", "heads"}` (each
  prompt as it starts its samples' text), then `{"type": "delta", "sample", "prompt_index", "text"}`
  while decoding, then one `{"type": "done", "samples", "stats"}` (what `--stream` and the HTTP
  server use).
- `complete(model, tok, framing, prompt, s)` is the one-prompt shortcut returning texts.
Special tokens (other than the end marker, which ends a sample) are never generated, and ids
beyond the tokenizer's vocabulary neither. With a `FormSpec` the output is an exact verse form
(`generate.forms`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Optional

from gpt2tune.errors import UserError
from gpt2tune.generate.decode import Decoder, decode
from gpt2tune.generate.detok import StopStream, TextStream, cut_at_stop
from gpt2tune.generate.rows import Result
from gpt2tune.generate.loops import find_loop
from gpt2tune.generate.sampling import Sampling
from gpt2tune.model.tokenizer import decode as detok
from gpt2tune.model.tokenizer import prompt_ids



@dataclass
class Sample:
    prompt_index: int
    prompt: str
    text: str  # the prompt (for verse forms: as a poem prefix) followed by the completion
    completion: str
    tokens: int  # new tokens, end marker excluded
    finish: str  # "eos", "length" or "stop"
    loop: Optional[dict] = None  # a repetition loop at the end (see generate.loops)
    score: Optional[float] = None

    def as_dict(self) -> dict:
        d = {"prompt": self.prompt, "text": self.text, "completion": self.completion, "tokens": self.tokens,
             "finish_reason": self.finish, "repetition_loop": self.loop}
        if self.score is not None:
            d["score"] = round(self.score, 4)
        return d


def model_vocab(model, tok) -> int:
    return max(getattr(model.config, "vocab_size", 0) or 0, len(tok))


def suppressed_ids(tok, model) -> list[int]:
    """Never generated: special tokens (the end marker is let through by the decoder) and ids the
    tokenizer does not have."""
    return sorted(set(tok.all_special_ids) | set(range(len(tok), model_vocab(model, tok))))


class Prepared:
    """Prompt ids (and the constraint) for a list of prompts. `form`: a
    `generate.constraints.ConstraintSpec` (verse forms: `generate.forms.FormSpec`) or None."""

    def __init__(self, model, tok, framing, prompts: list[str], form=None):
        self.prompts = list(prompts)
        self.constraint = None
        bos = [framing.bos] if framing.bos is not None else []
        if form is not None:
            self.constraint = form.build(tok, model_vocab(model, tok), self.prompts, framing.eos)
            self.heads = list(getattr(self.constraint, "prefixes", self.prompts))
            self.ids = [bos + self.constraint.prompt_ids(i) for i in range(len(self.prompts))]
        else:
            self.heads = list(self.prompts)
            self.ids = [prompt_ids(tok, framing, p) for p in self.prompts]
        for p, ids in zip(self.prompts, self.ids):
            if not ids:
                raise UserError(f"empty prompt {p!r} and the tokenizer has no begin marker to start from")


def _sample(tok, prep: Prepared, r: Result, stops: list[str]) -> Sample:
    completion = TextStream(tok).final(r.ids)  # a max-tokens cut inside a character drops it, no U+FFFD
    finish = r.finish
    if stops:
        completion, hit = cut_at_stop(completion, stops)
        finish = "stop" if hit else finish
    loop = find_loop(r.ids)
    loop_d = None
    if loop is not None:
        loop_d = loop.as_dict()
        loop_d["unit"] = detok(tok, r.ids[loop.start:loop.start + loop.period])
    p = r.prompt_index
    return Sample(p, prep.prompts[p], prep.heads[p] + completion, completion, len(r.ids), finish, loop_d, r.score)


def stream_texts(model, tok, framing, prompts: list[str], s: Sampling, form=None) -> Iterator[dict]:
    """Decode all prompts in one batch, yielding text deltas as tokens come, then the samples.

    Deltas of one sample concatenate to its completion (text held back while it could still be
    the start of a stop string is released at the end, cut before the stop string)."""
    if s.num_beams > 1:
        raise UserError("streaming does not work with beam search (num_beams > 1)")
    prep = Prepared(model, tok, framing, prompts, form)
    try:
        dec = Decoder(model, prep.ids, framing.eos, s, suppressed_ids(tok, model), prep.constraint, framing.pad)
    except ValueError as err:
        raise UserError(str(err)) from None
    outs = [StopStream(TextStream(tok), s.stop) for _ in dec.results]
    yield {"type": "start", "heads": list(prep.heads)}
    t0 = time.perf_counter()
    for ev in dec:
        for r, t in zip(ev.rows, ev.tokens):
            if r in ev.finished:
                continue
            delta, hit = outs[r].push(t)
            if hit:
                dec.finish(r, "stop")
            if delta:
                yield {"type": "delta", "sample": r, "prompt_index": dec.results[r].prompt_index, "text": delta}
    dt = time.perf_counter() - t0
    samples = [_sample(tok, prep, r, s.stop) for r in dec.results]
    for i, smp in enumerate(samples):
        rest = outs[i].flush(smp.completion)
        if rest:
            yield {"type": "delta", "sample": i, "prompt_index": smp.prompt_index, "text": rest}
    yield {"type": "done", "samples": samples, "stats": _stats(dec.tokens, dt)}


def _stats(tokens: int, seconds: float) -> dict:
    return {"new_tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}


def generate_texts(model, tok, framing, prompts: list[str], s: Sampling, form=None,
                   batch_size: int = 16) -> tuple[list[Sample], dict]:
    """Continue every prompt `s.num_return_sequences` times, `batch_size` prompts per batch.

    Returns the samples (prompt-major) and {"new_tokens", "seconds", "tokens_per_s"}."""
    if not prompts:
        raise UserError("no prompts to continue")
    samples: list[Sample] = []
    tokens, seconds = 0, 0.0
    for lo in range(0, len(prompts), max(1, batch_size)):
        chunk = prompts[lo:lo + batch_size]
        prep = Prepared(model, tok, framing, chunk, form)
        t0 = time.perf_counter()
        if s.stop and s.num_beams == 1:
            done = None
            for ev in stream_texts(model, tok, framing, chunk, s, form):
                if ev["type"] == "done":
                    done = ev
            got = done["samples"]
            tokens += done["stats"]["new_tokens"]
        else:
            try:
                results = decode(model, prep.ids, framing.eos, s, suppressed_ids(tok, model), prep.constraint,
                                 framing.pad)
            except ValueError as err:
                raise UserError(str(err)) from None
            got = [_sample(tok, prep, r, s.stop) for r in results]
            tokens += sum(len(r.ids) + (r.finish == "eos") for r in results)
        seconds += time.perf_counter() - t0
        for smp in got:
            smp.prompt_index += lo
        samples.extend(got)
    return samples, _stats(tokens, seconds)


def complete(model, tok, framing, prompt: str, s: Sampling) -> list[str]:
    samples, _ = generate_texts(model, tok, framing, [prompt], s)
    return [x.text for x in samples]
