"""The text of a growing completion (generate, chat, serve): never a partial character, never a
stop string.

Byte-level BPE (GPT-2) writes a character of several UTF-8 bytes over several tokens, so a
completion cut by `max_tokens` (or a stream delta sent between two tokens) can end inside a
character, which decodes to U+FFFD. For such tokenizers `TextStream` turns ids into bytes
itself and decodes them with an incremental UTF-8 decoder: the bytes of an incomplete trailing
character wait for the next token, and at the end they are dropped. Other tokenizers (character
or WordPiece vocabularies, which cannot split a character) go through `Detokenizer`,
and their final text loses a trailing U+FFFD.
"""

from __future__ import annotations

import codecs
import json
import threading
import weakref
from typing import Iterable, Optional

from gpt2tune.data.poetry import is_cjk
from gpt2tune.model.tokenizer import decode as detok

_BOUNDARY = set("，。！？；：、「」『』\n")

_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte <-> printable character map (`bytes_to_unicode`), inverted."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _byte_level(tok) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        dec = backend.decoder
        return dec is not None and json.loads(dec.__getstate__()).get("type") == "ByteLevel"
    return hasattr(tok, "byte_decoder")  # the slow GPT2Tokenizer


def byte_table(tok) -> Optional[list[bytes]]:
    """Each id's bytes as the tokenizer's decoding writes them (special tokens: none), for
    byte-level BPE tokenizers; None for others. Built once per tokenizer."""
    with _LOCK:
        if tok in _TABLES:
            return _TABLES[tok]
    table = None
    if _byte_level(tok):
        to_byte = _unicode_to_byte()
        n = len(tok)
        special = set(tok.all_special_ids)
        table = []
        for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(n)))):
            if i in special or piece is None:
                table.append(b"")
            elif all(ch in to_byte for ch in piece):
                table.append(bytes(to_byte[ch] for ch in piece))
            else:  # an added token: its own text (as the ByteLevel decoder does)
                table.append(piece.encode("utf-8"))
    with _LOCK:
        _TABLES[tok] = table
    return table


class TextStream:
    """The text of one completion as its tokens come: `push(token)` returns the text so far (whole
    characters only); `final(ids)` the text of all ids without an incomplete last character."""

    def __init__(self, tok):
        self.tok = tok
        self.table = byte_table(tok)
        if self.table is not None:
            self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
            self.text = ""
        else:
            self.detok = Detokenizer(tok)

    def _bytes(self, ids) -> bytes:
        t = self.table
        return b"".join(t[i] if 0 <= i < len(t) else b"" for i in ids)

    def push(self, token: int) -> str:
        if self.table is None:
            return self.detok.push(token)
        self.text += self.utf8.decode(self._bytes([token]))  # an incomplete character waits in the decoder
        return self.text

    def final(self, ids: list[int]) -> str:
        if self.table is None:
            return detok(self.tok, ids).rstrip("\ufffd")
        return codecs.getincrementaldecoder("utf-8")("replace").decode(self._bytes(ids))  # not final: drops the tail


class Detokenizer:
    """Incremental decoding for streaming: text so far after each pushed token, re-decoding only
    the tokens since the last safe boundary (a Chinese character, punctuation, whitespace; any
    complete character for byte-level BPE), with one token of context before it."""

    def __init__(self, tok):
        self.tok = tok
        self.byte_level = getattr(tok, "cls_token_id", None) is None
        self.ids: list[int] = []
        self.start = 0
        self.fixed = ""
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        ctx = self.ids[max(0, self.start - 1):self.start]  # one token of context: "##" pieces join onto it
        full = detok(self.tok, ctx + self.ids[self.start:])
        if full.endswith("\ufffd"):
            return self.text
        head = detok(self.tok, ctx) if ctx else ""
        piece = full[len(head):] if full.startswith(head) else detok(self.tok, self.ids[self.start:])
        self.text = self.fixed + piece
        last = piece[-1:]
        if last and (self.byte_level or last.isspace() or is_cjk(last) or last in _BOUNDARY):
            self.fixed, self.start = self.text, len(self.ids)
        return self.text


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """(`text` up to the first of `stops`, whether one occurred)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StopStream:
    """What a streamed completion may show, with stop strings: the one place where text is held
    back and cut (generate, chat and serve all stream through it).

    `push(token) -> (delta, hit)`: the text that can go out now. Text that could still be the start
    of a stop string waits; at a stop string the completion ends just before it (`hit` True, and
    later pushes return nothing). `flush(final)`: the rest, from the completion's final text (cut at
    its first stop string), once decoding has ended. The deltas concatenate to that final text.
    `lstrip`: leading whitespace is not shown (a chat template's space before the answer)."""

    def __init__(self, stream, stops: Iterable[str] = (), lstrip: bool = False):
        self.stream = stream  # TextStream or Detokenizer: push(token) -> the text so far
        self.stops = list(stops)  # Sampling refuses empty ones
        self.hold = max((len(x) for x in self.stops), default=1) - 1
        self.lstrip = lstrip
        self.text = ""  # the completion so far (cut before the stop string once hit)
        self.held = 0  # characters of `text` released so far
        self.shown = ""  # all the text returned so far
        self.hit = False

    def _out(self, text: str) -> str:
        shown = text.lstrip() if self.lstrip else text
        delta = shown[len(self.shown):]
        self.shown += delta
        return delta

    def push(self, token: int) -> tuple[str, bool]:
        if self.hit:
            return "", True
        self.text = self.stream.push(token)
        if self.stops:
            self.text, self.hit = cut_at_stop(self.text, self.stops)
            if not self.hit:
                self.held = max(self.held, len(self.text) - self.hold)
                return self._out(self.text[:self.held]), False
        return self._out(self.text), self.hit

    def flush(self, final: Optional[str] = None) -> str:
        """The text not yet returned: of `final` (the completion's own final text) where given,
        else of the text pushed so far."""
        text = self.text if final is None else final
        if self.stops:
            text, _ = cut_at_stop(text, self.stops)
        return self._out(text)
