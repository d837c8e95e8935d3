"""Best-of-n: sample N continuations of a prompt, keep the best by a metric (`generate --best-of N
--rank-by METRIC`).

Metrics:
- `logprob`: the mean log-probability per token of the completion (its end marker included when the
  sample ended there) under the model that wrote it; any text.
- `poem`: verse forms (`--form` or `--rows/--cols`): form compliance first (a compliant poem always
  ranks above a non-compliant one), then rhyme rate + tone-pattern conformity + fitting a standard
  tone pattern (1 or 0) - repeated-character rate, as `eval-poems` measures them (its lines: the
  exact ones of a compliant poem, else its clauses), by the prosody given (`--prosody`, classical
  by default).
- `form`, `rhyme`, `tones`, `pattern`, `repetition` (fewer repeated characters is better): one of
  those alone.
Ties keep the sampling order.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from gpt2tune.errors import UserError
from gpt2tune.evaluate.poems import loose_lines, parse_poem, pattern_of, repeated_char_rate, rhyme_checks, tone_checks
from gpt2tune.model.tokenizer import prompt_ids

RANK_BY = ("logprob", "poem", "form", "rhyme", "tones", "pattern", "repetition")
POEM_METRICS = RANK_BY[1:]


def poem_score(text: str, rows: int, cols: int, metric: str = "poem", prosody: str = "classical") -> float:
    exact = parse_poem(text, rows, cols)
    form = float(exact is not None)
    lines = exact if exact is not None else loose_lines(text, rows)
    if metric == "form":
        return form
    if metric == "repetition":
        return -repeated_char_rate(lines)
    pattern = float(exact is not None and pattern_of(exact, rows, cols, prosody) is not None)
    if metric == "pattern":
        return pattern
    rh, rt = rhyme_checks(lines, prosody)
    th, tt = tone_checks(lines, prosody)
    rhyme, tones = (rh / rt if rt else 0.0), (th / tt if tt else 0.0)
    if metric == "rhyme":
        return rhyme
    if metric == "tones":
        return tones
    return 10.0 * form + rhyme + tones + pattern - repeated_char_rate(lines)


@torch.no_grad()
def mean_logprob(model, tok, framing, prompt: str, completion: str, ended: bool) -> float:
    """Mean log-probability per token of `completion` (and the end marker if `ended`) after `prompt`."""
    start = max(1, len(prompt_ids(tok, framing, prompt)))  # (a first token without context is not scored)
    full = prompt_ids(tok, framing, prompt + completion) + ([framing.eos] if ended and framing.eos is not None else [])
    return _mean_from(model, full, start) if len(full) > start else float("-inf")


def _mean_from(model, ids: list[int], start: int) -> float:
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -len(ids):-1].float()
    lp = torch.log_softmax(logits, -1)[0].gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1)
    return float(lp[start - 1:].mean())


def scores_of(samples: Sequence, metric: str, model=None, tok=None, framing=None,
              shape: Optional[tuple[int, int]] = None, prosody: str = "classical") -> list[float]:
    """One score per sample (higher is better)."""
    if metric not in RANK_BY:
        raise UserError(f"--rank-by: unknown metric {metric!r}; valid: {', '.join(RANK_BY)}")
    if metric == "logprob":
        was = model.training
        model.eval()
        try:
            return [mean_logprob(model, tok, framing, s.text[: len(s.text) - len(s.completion)], s.completion,
                                 s.finish == "eos") for s in samples]
        finally:
            model.train(was)
    if shape is None:
        raise UserError(f"--rank-by {metric} scores poems: give a verse form (--form, or --rows and --cols)")
    return [poem_score(s.text, shape[0], shape[1], metric, prosody) for s in samples]


def keep_best(samples: Sequence, scores: Sequence[float], n: int) -> list:
    """The `n` best samples of every prompt (by `prompt_index`), best first, each with its `score`."""
    by_prompt: dict[int, list] = {}
    for i, (s, sc) in enumerate(zip(samples, scores)):
        s.score = sc
        by_prompt.setdefault(s.prompt_index, []).append((-sc, i, s))
    out = []
    for k in sorted(by_prompt):
        out += [s for _, _, s in sorted(by_prompt[k], key=lambda t: (t[0], t[1]))[:n]]
    return out
