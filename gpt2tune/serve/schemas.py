"""Request bodies of the HTTP API and its OpenAI-style errors.

Bodies are validated strictly (a string where a number belongs is an error, not coerced) and
unknown fields are refused, so a typo never silently changes what is generated. OpenAI fields
that this server cannot honour (presence/frequency penalties, logprobs, logit_bias, best_of,
suffix) are accepted only at their neutral values. Extensions: `top_k`,
`repetition_penalty`, and the verse-form fields `form`, `acrostic`, `rhyme`, `no_repeat_chars`.

Every error is `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.

`Limits` bounds a request's size (body bytes, prompt characters, messages, stop-string length)
before anything is tokenized, so one huge request cannot stall the server for the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from gpt2tune.errors import UserError

MAX_N = 16
MAX_STOP = 4


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def utf8(texts: list[str], param: str) -> list[str]:
    """The texts, or a 400 when one cannot be written as UTF-8 (lone surrogates from JSON escapes)."""
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request(f"{param} holds text that is not valid Unicode (a lone surrogate)", param) from None
    return texts


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


@dataclass(frozen=True)
class Limits:
    """Request size limits; each can also be set with an environment variable (`ENV`)."""

    body_bytes: int = 4 * 1024 * 1024  # the whole body (413 beyond)
    prompt_chars: int = 100_000  # all prompts, message contents or classify inputs of a request together
    messages: int = 256  # chat messages in a request
    stop_chars: int = 256  # each stop string

    ENV = {"body_bytes": "GPT2TUNE_MAX_BODY_BYTES", "prompt_chars": "GPT2TUNE_MAX_PROMPT_CHARS",
           "messages": "GPT2TUNE_MAX_MESSAGES", "stop_chars": "GPT2TUNE_MAX_STOP_CHARS"}

    def __post_init__(self):
        for f in fields(self):
            if not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 1:
                raise UserError(f"limit {f.name} ({self.ENV[f.name]}) must be a whole number >= 1")

    @classmethod
    def from_env(cls, env=None) -> "Limits":
        """The defaults, replaced by the `GPT2TUNE_MAX_*` environment variables that are set."""
        env = os.environ if env is None else env
        given = {}
        for name, var in cls.ENV.items():
            if env.get(var):
                try:
                    given[name] = int(env[var])
                except ValueError:
                    raise UserError(f"{var} must be a whole number, not {env[var]!r}") from None
        return cls(**given)

    def _chars(self, texts: list, param: str, what: str) -> None:
        n = sum(len(t) for t in texts if isinstance(t, str))
        if n > self.prompt_chars:
            raise bad_request(f"{what} has {n} characters; this server allows at most {self.prompt_chars} per request",
                              param, "string_above_max_length")

    def check(self, req) -> None:
        """A 400 when `req` is over a limit (cheap: lengths only, nothing tokenized)."""
        if isinstance(req, CompletionRequest):
            self._chars([req.prompt] if isinstance(req.prompt, str) else list(req.prompt), "prompt", "the prompt")
        elif isinstance(req, ChatRequest):
            if len(req.messages) > self.messages:
                raise bad_request(f"{len(req.messages)} messages; this server allows at most {self.messages}",
                                  "messages", "array_above_max_length")
            self._chars([m.content for m in req.messages], "messages", "the conversation")
        elif isinstance(req, ClassifyRequest):
            self._chars([req.input] if isinstance(req.input, str) else list(req.input), "input", "the input")
        stop = getattr(req, "stop", None)
        for x in [stop] if isinstance(stop, str) else list(stop or []):
            if len(x) > self.stop_chars:
                raise bad_request(f"a stop sequence has {len(x)} characters; this server allows at most "
                                  f"{self.stop_chars}", "stop", "string_above_max_length")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by completions and chat completions."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)  # 0: greedy
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)  # extension
    repetition_penalty: Optional[float] = Field(None, gt=0)  # extension
    n: Optional[int] = Field(None, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # OpenAI fields accepted at their neutral values only (checked in `unsupported`)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    logprobs: Union[bool, int, None] = None

    def stops(self) -> list[str]:
        stops = utf8([self.stop] if isinstance(self.stop, str) else list(self.stop or []), "stop")
        if len(stops) > MAX_STOP:
            raise bad_request(f"at most {MAX_STOP} stop sequences are allowed", "stop")
        if any(not s for s in stops):
            raise bad_request("stop sequences must not be empty", "stop")
        return stops

    def unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise bad_request(f"{name} is not supported by this server (use repetition_penalty)", name,
                                  "unsupported_parameter")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server", "logit_bias", "unsupported_parameter")
        if self.logprobs not in (None, False, 0):
            raise bad_request("logprobs are not supported by this server", "logprobs", "unsupported_parameter")


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]] = ""
    echo: Optional[bool] = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    # verse-form extensions (character-level Chinese tokenizers)
    form: Optional[str] = None
    acrostic: Optional[str] = None
    rhyme: Optional[bool] = False
    prosody: Optional[Literal["classical", "modern"]] = None  # what rhyme means (default classical: 平水韻)
    rhyme_group: Optional[str] = None  # with rhyme: e.g. 東 (a 平水韻 level group)
    tones: Optional[Literal["strict", "standard"]] = None  # tone pattern of regulated verse
    pattern: Optional[Literal["ping-rhymed", "ping-unrhymed", "ze-rhymed", "ze-unrhymed"]] = None
    no_repeat_chars: Optional[bool] = False

    def prompts(self) -> list[str]:
        prompts = utf8([self.prompt] if isinstance(self.prompt, str) else list(self.prompt), "prompt")
        if not prompts:
            raise bad_request("prompt must be a string or a non-empty list of strings", "prompt")
        return prompts

    def unsupported(self) -> None:
        super().unsupported()
        if self.best_of not in (None, self.n or 1):
            raise bad_request("best_of is not supported by this server (leave it out or equal to n)", "best_of",
                              "unsupported_parameter")
        if self.suffix:
            raise bad_request("suffix (insertion) is not supported by this server", "suffix", "unsupported_parameter")


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    def limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ClassifyRequest(_Strict):
    model: Optional[str] = None
    input: Union[str, list[str]]

    def texts(self) -> list[str]:
        texts = utf8([self.input] if isinstance(self.input, str) else list(self.input), "input")
        if not texts:
            raise bad_request("input must be a string or a non-empty list of strings", "input")
        return texts
