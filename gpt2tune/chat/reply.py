"""Replies of a chat model: the prompt built from the history, and a streamed answer.

    from gpt2tune.chat.reply import load_chat_model, Reply
    chat = load_chat_model("runs/chat")
    r = Reply(chat, [{"role": "user", "content": "add 2 and 3"}], Sampling(greedy=True))
    for piece in r:            # text as it is generated
        print(piece, end="")
    r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.dropped

The history sent to the model keeps the latest whole turns that fit the context window
with room for `max_new_tokens` (`dropped` says how many earliest messages were left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from gpt2tune.chat.history import fit_messages
from gpt2tune.chat.masking import encode_segments
from gpt2tune.chat.messages import check_messages
from gpt2tune.chat.template import ChatTemplate, end_id, load_template
from gpt2tune.errors import UserError
from gpt2tune.generate.decode import Decoder
from gpt2tune.generate.sampling import Sampling
from gpt2tune.generate.detok import Detokenizer, StopStream, cut_at_stop
from gpt2tune.generate.text import suppressed_ids
from gpt2tune.model.quiet import quiet_transformers
from gpt2tune.model.tokenizer import decode


@dataclass
class ChatModel:
    model: object
    tok: object
    framing: object
    template: ChatTemplate

    @property
    def n_positions(self) -> int:
        return getattr(self.model.config, "n_positions", None) or 1024

    @property
    def end_id(self) -> int:
        """The token that ends a reply (the template's end marker)."""
        return end_id(self.template, self.tok, self.framing)


def load_chat_model(path: str | Path) -> ChatModel:
    """A chat run (or its model folder) ready to answer; UserError for runs of other tasks."""
    from gpt2tune.method.io import load_run, model_folder

    model, tok, framing = load_run(path)
    folder = model_folder(path)
    template = load_template(folder) or load_template(path)
    if template is None:
        raise UserError(f"{path} is not a chat model (no chat.json next to the model); train one with task: chat")
    return ChatModel(model, tok, framing, template)


def prompt_ids(chat: ChatModel, messages: list[dict], max_new_tokens: int) -> tuple[list[int], list[dict], int]:
    """(ids of the history and the generation prompt, the messages kept, how many were dropped).

    The prompt is at most `n_positions - max_new_tokens` tokens (at least one token of room
    is always kept for the reply)."""
    messages = check_messages(messages)
    if not messages or messages[-1]["role"] == "assistant":
        raise UserError("the conversation must end with a user (or system) message to answer")
    budget = chat.n_positions - max(1, min(max_new_tokens, chat.n_positions - 1))
    cache: dict[str, list[int]] = {}

    def ids_of(msgs: list[dict]) -> list[int]:
        segs = chat.template.segments(msgs, add_generation_prompt=True)
        key = "".join(s[0] for s in segs)
        if key not in cache:  # markers from the template only: a message cannot open a turn
            cache[key] = encode_segments(chat.tok, segs).ids
        return cache[key]

    kept, dropped = fit_messages(messages, lambda ms: len(ids_of(ms)) <= budget)
    if kept is None:
        raise UserError(f"the message is too long: the model's context is {chat.n_positions} tokens and "
                        f"{max_new_tokens} are kept for the reply")
    return ids_of(kept), kept, dropped


class Reply:
    """One streamed answer to a conversation; iterate for the text pieces."""

    def __init__(self, chat: ChatModel, messages: list[dict], s: Sampling):
        self.chat = chat
        self.sampling = s
        self.ids, self.kept, self.dropped = prompt_ids(chat, messages, s.max_new_tokens)
        self.prompt_tokens = len(self.ids)
        self.completion_tokens = 0
        self.finish_reason: Optional[str] = None  # "stop" (end marker) or "length"
        self.raw = ""

    @property
    def text(self) -> str:
        return self.chat.template.clean_reply(self.raw)

    def __iter__(self) -> Iterator[str]:
        chat, s = self.chat, self.sampling
        if s.num_beams > 1 or s.num_return_sequences != 1:
            raise UserError("a chat reply is one sampled sequence (no beam search, num_return_sequences 1)")
        try:
            dec = Decoder(chat.model, [self.ids], chat.end_id, s, suppressed_ids(chat.tok, chat.model), pad_id=chat.framing.pad)
        except ValueError as err:
            raise UserError(str(err)) from None
        out = StopStream(Detokenizer(chat.tok), s.stop, lstrip=True)  # the template's space before the answer is not shown
        with quiet_transformers():  # no padding-mask advice for an unpadded single prompt
            for event in dec:
                for row, t in zip(event.rows, event.tokens):
                    if row != 0 or row in event.finished or out.hit:
                        continue
                    piece, hit = out.push(t)
                    if hit:
                        dec.finish(0, "stop")
                    if piece:
                        yield piece
        piece = out.flush()  # what was held back for a stop string that never came
        if piece:
            yield piece
        res = dec.results[0]
        self.completion_tokens = len(res.ids)
        self.raw, _ = cut_at_stop(decode(chat.tok, res.ids), out.stops)
        self.finish_reason = "stop" if res.finish in ("eos", "stop") or out.hit else res.finish


def reply(chat: ChatModel, messages: list[dict], s: Sampling) -> str:
    """The whole answer at once."""
    r = Reply(chat, messages, s)
    for _ in r:
        pass
    return r.text
