"""Token rows with a loss mask: only answers are trained.

A row is `Masked(ids, labels)`: `labels[i]` is `ids[i]` where the loss applies and -100
elsewhere (system/user turns, role prefixes, prompts, padding). The text is tokenized
between the template's markers, as the tokenizer does (so the ids are those of the rendered
string), special-token strings inside messages staying text, and the trained character spans
are mapped onto tokens with the tokenizer's offsets; a token that straddles a boundary counts
as trained.
"""

from __future__ import annotations

import functools
import re
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from gpt2tune.chat.history import fit_messages
from gpt2tune.chat.template import ChatTemplate
from gpt2tune.data.cache import TokenStore
from gpt2tune.data.dataset import IGNORE, pad_rows


@dataclass
class Masked:
    ids: list[int]
    labels: list[int]

    def __len__(self) -> int:  # batching groups rows by length
        return len(self.ids)

    @property
    def trained(self) -> int:
        return sum(1 for l in self.labels if l != IGNORE)


class MaskedStore:
    """Masked rows read from a corpus cache entry (see data/corpus.py `encode_records`): the ids and a
    uint8 mask (1 where trained) as two memory-mapped `TokenStore`s with the same offsets; `store[i]`
    is row i as a `Masked`."""

    def __init__(self, ids: TokenStore, mask: TokenStore):
        if not np.array_equal(ids.offsets, mask.offsets):
            raise ValueError("the ids and the masks of a cached split have different rows")
        self.store, self.mask = ids, mask

    @property
    def lengths(self) -> np.ndarray:
        return self.store.lengths

    def __len__(self) -> int:
        return len(self.store)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __getitem__(self, i) -> Masked:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        ids = self.store.ids(int(i)).astype(np.int64)
        return Masked(ids.tolist(), np.where(self.mask.ids(int(i)) != 0, ids, IGNORE).tolist())

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def collate_masked(rows: list[Masked], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest; padding gets attention 0 and label -100."""
    ids, mask = pad_rows([r.ids for r in rows], pad_id)
    labels, _ = pad_rows([r.labels for r in rows], IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_segments(tok, segments: list[tuple[str, bool, bool]]) -> Masked:
    """Tokenize the concatenated (piece, trained, content) segments; label the tokens that overlap
    trained pieces.

    Only the template's own pieces may hold special tokens (markers such as `<|endoftext|>` or
    `<|user|>`); in content a special-token string is plain text. The text is cut at the template's
    markers and each stretch between them tokenized as text, which is what the tokenizer itself does
    around special tokens: without special strings in the content, the ids are exactly the
    tokenizer's ids for the whole rendered string (what `apply_chat_template` gives)."""
    splitter = _splitter(tuple(special_strings(tok)))
    runs: list[list] = [["", []]]  # text stretches between markers: [text, trained spans]; markers as ints
    trained_marker: dict[int, bool] = {}
    for text, trained, content in segments:
        pieces = [text] if content or splitter is None else splitter.split(text)
        for j, piece in enumerate(pieces):
            if j % 2:  # a marker of the template
                mid = tok.convert_tokens_to_ids(piece)
                runs.append(mid)
                trained_marker[len(runs) - 1] = trained
                runs.append(["", []])
            elif piece:
                run = runs[-1]
                if trained:
                    run[1].append((len(run[0]), len(run[0]) + len(piece)))
                run[0] += piece
    texts = [run[0] for run in runs if not isinstance(run, int) and run[0]]
    encoded = iter(_offsets_encoder(tok)(texts) if texts else [])
    ids, labels = [], []
    for k, run in enumerate(runs):
        if isinstance(run, int):
            ids.append(run)
            labels.append(run if trained_marker[k] else IGNORE)
            continue
        text, spans = run
        if not text:
            continue
        run_ids, offsets = next(encoded)
        mark = bytearray(len(text) + 1)  # 1 on the trained characters
        for a, b in spans:
            mark[a:b] = b"\x01" * (b - a)
        for i, (a, b) in zip(run_ids, offsets):
            # a token overlapping a trained span is trained (an empty one: where it starts)
            ids.append(i)
            labels.append(i if (mark.find(1, a, b) >= 0 if b > a else mark[a] == 1) else IGNORE)
    return Masked(ids, labels)


@functools.lru_cache(maxsize=64)
def _splitter(specials: tuple[str, ...]):
    """A pattern that cuts text at special-token strings and keeps them (None: no specials)."""
    return re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None


class _OffsetsEncoder:
    """texts -> [(ids, offsets)], as `tok(text, add_special_tokens=False, split_special_tokens=True,
    return_offsets_mapping=True)` gives them for each text. A tokenizer backed by `tokenizers` is
    called directly, through a copy of its Rust tokenizer that encodes special-token strings as text
    one text at a time (two thirds of the transformers call's time on short chat stretches; its
    `encode_batch` is slower for a few texts); used only when its first answer equals the
    transformers call's, else (and for other tokenizers) that call is."""

    def __init__(self, tok):
        from gpt2tune.data.corpus import text_copy

        self.tok, self.size, self.rust, self.checked = tok, len(tok), text_copy(tok), False

    def __call__(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        if self.rust is not None:
            got = [(e.ids, e.offsets) for e in (self.rust.encode(t, add_special_tokens=False) for t in texts)]
            if self.checked:
                return got
            self.checked = True
            if got == self._transformers(texts):
                return got
            self.rust = None
        return self._transformers(texts)

    def _transformers(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        enc = self.tok(texts, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        return [(list(i), [tuple(o) for o in offs]) for i, offs in zip(enc["input_ids"], enc["offset_mapping"])]


_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _offsets_encoder(tok) -> _OffsetsEncoder:
    """The encoder of `tok`, made again when tokens were added to it (a chat template's markers)."""
    try:
        hit = _ENCODERS.get(tok)
    except TypeError:  # not weakly referenceable: no cache
        return _OffsetsEncoder(tok)
    if hit is None or hit.size != len(tok):
        hit = _ENCODERS[tok] = _OffsetsEncoder(tok)
    return hit


def special_strings(tok) -> list[str]:
    """The tokenizer's special-token strings (added chat markers included), longest first."""
    found = set(getattr(tok, "all_special_tokens", []) or [])
    for t in getattr(tok, "added_tokens_decoder", {}).values():
        if getattr(t, "special", False):
            found.add(str(t))
    return sorted((s for s in found if s), key=len, reverse=True)


@dataclass
class FitStats:
    samples: int = 0
    dropped_turns: int = 0  # messages dropped from the front of long conversations
    shortened: int = 0  # conversations that lost turns
    prompt_cut: int = 0  # a last question cut from its start to keep the whole answer
    answer_cut: int = 0  # an answer longer than max_length, cut at its end
    skipped_no_answer: int = 0  # nothing trainable: no assistant turn
    skipped_too_long: int = 0  # nothing trainable left after truncation
    trained_tokens: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return self.skipped_no_answer + self.skipped_too_long

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        return {**d, **self.extra}

    COUNTERS = ("samples", "dropped_turns", "shortened", "prompt_cut", "answer_cut", "skipped_no_answer",
                "skipped_too_long", "trained_tokens")

    def vector(self) -> list[int]:
        """The counters in COUNTERS order (summed over rows, they give the stats of a set of rows)."""
        return [getattr(self, k) for k in self.COUNTERS]

    @classmethod
    def of_vector(cls, v) -> "FitStats":
        return cls(**{k: int(x) for k, x in zip(cls.COUNTERS, v)})

    def accept(self, row):
        """Count a fitted row; None (and counted as skipped) when nothing in it is trained."""
        if row.trained == 0:
            self.skipped_too_long += 1
            return None
        self.samples += 1
        self.trained_tokens += row.trained
        return row


def cut_to_fit(m: Masked, bos_len: int, max_length: int, st: FitStats) -> Masked:
    """Fit one too-long exchange: keep the whole answer and the end of the question; if even
    the answer does not fit, cut it at the end."""
    first = next((i for i, l in enumerate(m.labels) if l != IGNORE), len(m.ids))
    answer = len(m.ids) - first
    room = max_length - bos_len - answer
    if room >= 1:
        st.prompt_cut += 1
        keep = slice(first - room, None)
        return Masked(m.ids[:bos_len] + m.ids[keep], m.labels[:bos_len] + m.labels[keep])
    st.answer_cut += 1
    return Masked(m.ids[:max_length], m.labels[:max_length])


def encode_conversation(tok, template: ChatTemplate, messages: list[dict], max_length: int,
                        st: FitStats | None = None) -> Masked | None:
    """One training row for a conversation, or None when nothing trainable is left.

    Trailing non-assistant turns are dropped; a conversation longer than `max_length` loses
    whole earliest turns (the system prompt stays while it fits) rather than any part of
    its last answer.
    """
    st = st if st is not None else FitStats()
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        st.skipped_no_answer += 1
        return None
    messages = messages[: last + 1]
    cache: dict[tuple, Masked] = {}

    def enc(msgs: list[dict]) -> Masked:
        key = (len(msgs), id(msgs[0]) if msgs else 0)  # suffixes differ in length or first message
        if key not in cache:
            cache[key] = encode_segments(tok, template.segments(msgs))
        return cache[key]

    full = enc(messages)
    if len(full) <= max_length:
        row = full
    else:
        kept, dropped = fit_messages(messages, lambda ms: len(enc(ms)) <= max_length, must_keep=last)
        if kept is not None:
            row = enc(kept)
            st.shortened += 1
            st.dropped_turns += dropped
        else:
            start = last - 1 if last >= 1 and messages[last - 1]["role"] == "user" else last
            bos_len = len(tok(template.bos, add_special_tokens=False)["input_ids"]) if template.bos else 0
            row = cut_to_fit(enc(messages[start:]), bos_len, max_length, st)
            st.shortened += 1
            st.dropped_turns += start
    return st.accept(row)
