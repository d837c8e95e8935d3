"""Preference pairs as token rows: the prompt framed like the other tasks, each response trained.

Text pairs are `[bos] prompt response [eos]` (prompt + response joined verbatim, as TRL does), with
`response [eos]` labelled. Message pairs are rendered by the chat template (`chat.template`): the
shared prompt turns are context, the response turns (the assistant's answer and its end marker) are
labelled. Tokenization is that of the whole rendered string (`masking.encode_segments`), so the ids
are what the tokenizer gives for the text; a token straddling the seam counts as response.

A pair longer than `max_length` keeps both whole responses and the end of the prompt, cut the same
way on both sides; when even a response does not fit, it is cut at its end.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from gpt2tune.chat.masking import encode_segments
from gpt2tune.chat.template import ChatTemplate
from gpt2tune.data.dataset import IGNORE
from gpt2tune.data.preference import Pair, PreferenceItem, Side


@dataclass
class PairStats:
    pairs: int = 0
    prompt_cut: int = 0  # prompts shortened at their start to fit max_length
    response_cut: int = 0  # responses cut at their end (even they did not fit)
    skipped: int = 0  # nothing left to compare after fitting
    response_tokens: int = 0  # labelled tokens, chosen and rejected

    def as_dict(self) -> dict:
        return asdict(self)


def segments_of(item: PreferenceItem, response, template: Optional[ChatTemplate], bos: str, eos: str) -> list:
    """(piece, trained, content) triples of prompt + one response."""
    if not item.chat:
        segs = [(bos, False, False), (item.prompt, False, True), (response, True, True), (eos, True, False)]
        return [s for s in segs if s[0]]
    prompt = template.segments(item.prompt)
    full = template.segments(item.prompt + response)
    assert full[: len(prompt)] == prompt, "a template renders a conversation message by message"
    return [(t, False, c) for t, _, c in prompt] + full[len(prompt):]


def _first_trained(s: Side) -> int:
    return next((i for i, x in enumerate(s.labels) if x != IGNORE), len(s.labels))


def fit_pair(c: Side, r: Side, head: int, max_length: int, st: PairStats) -> tuple[Side, Side]:
    """Cut a pair to `max_length`: the first `head` tokens (the start marker) stay, prompts lose their
    start (both keep the same number of prompt tokens), responses are cut at the end only if needed."""
    if max(len(c), len(r)) <= max_length:
        return c, r
    fc, fr = _first_trained(c), _first_trained(r)
    resp = max(len(c) - fc, len(r) - fr)
    room = max_length - head - resp
    if room < 1:
        room = min(1, fc - head, fr - head)
        st.response_cut += 1
    else:
        st.prompt_cut += 1

    def cut(s: Side, first: int) -> Side:
        keep = list(range(head)) + list(range(max(head, first - room), len(s)))
        keep = keep[:max_length]
        return Side([s.ids[i] for i in keep], [s.labels[i] for i in keep])

    return cut(c, fc), cut(r, fr)


def encode_pair(tok, item: PreferenceItem, template: Optional[ChatTemplate], bos: str, eos: str,
                max_length: int, st: Optional[PairStats] = None) -> Optional[Pair]:
    st = st if st is not None else PairStats()
    c = encode_segments(tok, segments_of(item, item.chosen, template, bos, eos))
    r = encode_segments(tok, segments_of(item, item.rejected, template, bos, eos))
    head = len(tok(bos, add_special_tokens=False)["input_ids"]) if bos and not item.chat else 0
    if item.chat and template.bos:
        head = len(tok(template.bos, add_special_tokens=False)["input_ids"])
    c, r = fit_pair(Side(c.ids, c.labels), Side(r.ids, r.labels), head, max_length, st)
    if c.trained == 0 or r.trained == 0 or (c.ids == r.ids):
        st.skipped += 1
        return None
    st.pairs += 1
    st.response_tokens += c.trained + r.trained
    return Pair(c, r)


def encode_pairs(tok, items: list[PreferenceItem], template: Optional[ChatTemplate], bos: str, eos: str,
                 max_length: int) -> tuple[list[Pair], PairStats]:
    st = PairStats()
    rows = [p for it in items if (p := encode_pair(tok, it, template, bos, eos, max_length, st)) is not None]
    return rows, st
