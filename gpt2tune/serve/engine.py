"""The run being served and how a request becomes a job for the batching worker.

`load_engine(RUN)` loads a run folder, model folder (or an adapter run) once:
- a GPT-2 classifier (`task: classification`) serves `/v1/classify`;
- a model whose tokenizer has a chat template (`task: chat`; any Hugging Face chat model)
  serves `/v1/chat/completions` (the prompt is `tokenizer.apply_chat_template`) and
  `/v1/completions`;
- any other causal LM serves `/v1/completions`.

`completion_job`, `chat_job` and `classify_job` validate a request against the run (task,
`max_tokens` cap, context window, verse form) and tokenize it; they raise `APIError` (4xx).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from gpt2tune.errors import UserError
from gpt2tune.generate.rows import context_size
from gpt2tune.generate.sampling import Sampling
from gpt2tune.model.tokenizer import encode_text, prompt_ids
from gpt2tune.serve.batching import ClassifyJob, GenJob
from gpt2tune.serve.schemas import APIError, ChatRequest, ClassifyRequest, CompletionRequest, bad_request, utf8

TASKS = ("causal-lm", "chat", "classification")
MAX_ROWS = 64  # prompts x n in one request
ENDPOINT = {"causal-lm": "/v1/completions", "chat": "/v1/chat/completions", "classification": "/v1/classify"}


@dataclass
class Engine:
    model: object
    tok: object
    framing: object
    task: str  # one of TASKS
    name: str  # the model id clients give
    max_tokens_cap: int = 256
    chat_end: Optional[int] = None  # the token that ends a chat reply
    template: Optional[object] = None  # gpt2tune's ChatTemplate, when the run saved one (chat.json)
    forms: bool = False  # verse forms can be enforced with this tokenizer
    labels: list = field(default_factory=list)
    weights: str = "model"  # decoding weights of every request (generate.fast)
    created: int = field(default_factory=lambda: int(time.time()))
    tok_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def context(self) -> int:
        return context_size(self.model)

    def info(self) -> dict:
        """The OpenAI model object, with this server's extensions."""
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "gpt2tune",
                "task": self.task, "context_length": self.context, "max_tokens_cap": self.max_tokens_cap,
                "verse_forms": self.forms, "labels": self.labels or None}

    # -- checks shared by the endpoints ---------------------------------------
    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.name!r}",
                           "invalid_request_error", "model", "model_not_found")

    def check_task(self, endpoint: str, *ok: str) -> None:
        if self.task not in ok:
            raise bad_request(f"{endpoint} is not available for this run: {self.name!r} is a {self.task} run "
                              f"(use {ENDPOINT[self.task]})", None, "wrong_task")

    def encode(self, text: str, param: str = "prompt", framing=None) -> list[int]:
        """`text`'s ids (text is text: no control tokens from a prompt); with `framing`, as a
        prompt: after the begin marker."""
        try:
            with self.tok_lock:
                return prompt_ids(self.tok, framing, text) if framing is not None else encode_text(self.tok, text)
        except Exception as err:  # noqa: BLE001 - odd text must not become a 500
            raise bad_request(f"the {param} could not be tokenized: {err}", param) from None

    def _max_tokens(self, asked: Optional[int], default: int) -> int:
        if asked is not None and asked > self.max_tokens_cap:
            raise bad_request(f"max_tokens is {asked} but this server allows at most {self.max_tokens_cap} "
                              "(gpt2tune serve --max-tokens-cap)", "max_tokens", "max_tokens_too_large")
        return asked if asked is not None else max(1, min(default, self.max_tokens_cap))

    def _fits(self, prompt_tokens: int, max_tokens: int, param: str) -> None:
        if prompt_tokens >= self.context or prompt_tokens + max_tokens > self.context:
            raise bad_request(f"This model's maximum context length is {self.context} tokens, however you requested "
                              f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in your prompt; {max_tokens} for "
                              "the completion). Please reduce your prompt or max_tokens.", param,
                              "context_length_exceeded")

    def _sampling(self, req, stops: list[str]) -> Sampling:
        temperature = 1.0 if req.temperature is None else req.temperature
        s = Sampling(greedy=temperature == 0, temperature=temperature or 1.0,
                     top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                     repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                     seed=req.seed, stop=stops, weights=self.weights)
        msg = s.check()
        if msg:
            raise bad_request(msg)
        return s

    # -- jobs -----------------------------------------------------------------
    def completion_job(self, req: CompletionRequest) -> GenJob:
        self.check_model(req.model)
        self.check_task("/v1/completions", "causal-lm", "chat")
        req.unsupported()
        prompts, stops, n = req.prompts(), req.stops(), req.n or 1
        if len(prompts) * n > MAX_ROWS:
            raise bad_request(f"at most {MAX_ROWS} completions per request (prompts x n)", "n")
        s = self._sampling(req, stops)
        form = self._form(req)
        if form is not None:
            if req.max_tokens is not None:
                self._max_tokens(req.max_tokens, 0)
            return self._form_job(req, prompts, form, s, n)
        max_tokens = self._max_tokens(req.max_tokens, 16)
        ids = []
        for i, p in enumerate(prompts):
            row = self.encode(p, framing=self.framing)
            if not row:
                raise bad_request(f"prompt {i} is empty and the tokenizer has no begin marker to start from", "prompt")
            self._fits(len(row), max_tokens, "prompt")
            ids.append(row)
        return GenJob(prompts=prompts, heads=list(prompts), ids=ids, n=n, max_tokens=max_tokens, sampling=s,
                      eos=self.framing.eos, echo=bool(req.echo))

    def _form(self, req: CompletionRequest):
        if req.form is None and not req.acrostic and not req.rhyme and not req.no_repeat_chars and not req.tones:
            return None
        from gpt2tune.generate.forms import form_spec

        try:
            spec = form_spec(req.form, None, None, req.acrostic, bool(req.rhyme), bool(req.no_repeat_chars),
                             req.prosody or "classical", req.tones, req.pattern, req.rhyme_group)
        except UserError as err:
            raise bad_request(str(err).replace("--no-repeat-chars", "no_repeat_chars").replace("--rhyme-group", "rhyme_group").replace("--", ""), "form",
                              "invalid_form") from None
        if not self.forms:
            raise bad_request("verse forms need a tokenizer that writes every Chinese character as one token; "
                              f"{self.name!r} does not have one", "form", "invalid_form")
        return spec

    def _form_job(self, req, prompts, form, s, n) -> GenJob:
        from gpt2tune.generate.text import Prepared

        try:
            with self.tok_lock:
                prep = Prepared(self.model, self.tok, self.framing, prompts, form)
        except UserError as err:
            raise bad_request(str(err).replace("--", ""), "prompt", "invalid_form") from None
        except Exception as err:  # noqa: BLE001
            raise bad_request(f"the prompt could not be prepared for the verse form: {err}", "prompt") from None
        need = prep.constraint.max_new_tokens
        for row in prep.ids:
            self._fits(len(row), need, "prompt")
        return GenJob(prompts=prompts, heads=prep.heads, ids=prep.ids, n=n, max_tokens=need, sampling=s,
                      eos=self.framing.eos, form=form, echo=bool(req.echo))

    def chat_job(self, req: ChatRequest) -> GenJob:
        self.check_model(req.model)
        self.check_task("/v1/chat/completions", "chat")
        req.unsupported()
        stops, n = req.stops(), req.n or 1
        if n > MAX_ROWS:
            raise bad_request(f"at most {MAX_ROWS} completions per request", "n")
        s = self._sampling(req, stops)
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        utf8([m["content"] for m in messages], "messages")
        if messages[-1]["role"] == "assistant":
            raise bad_request("the conversation must end with a user (or system) message to answer", "messages")
        try:
            with self.tok_lock:
                if self.template is not None:  # markers from the template only: a message cannot open a turn
                    from gpt2tune.chat.masking import encode_segments

                    segs = self.template.segments(messages, add_generation_prompt=True)
                    text, ids = "".join(s[0] for s in segs), encode_segments(self.tok, segs).ids
                else:
                    text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                    ids = None
        except Exception as err:  # noqa: BLE001 - a template may raise anything on odd input
            raise bad_request(f"the chat template could not render these messages: {err}", "messages") from None
        if ids is None:
            ids = self.encode(text, "messages")
        if not ids:
            raise bad_request("the chat template rendered an empty prompt", "messages")
        limit = req.limit()
        max_tokens = self._max_tokens(limit, max(1, self.context - len(ids)))
        self._fits(len(ids), max_tokens, "messages")
        return GenJob(prompts=[text], heads=[""], ids=[ids], n=n, max_tokens=max_tokens, sampling=s,
                      eos=self.chat_end if self.chat_end is not None else self.framing.eos, lstrip=True)

    def classify_job(self, req: ClassifyRequest) -> ClassifyJob:
        self.check_model(req.model)
        self.check_task("/v1/classify", "classification")
        texts = req.texts()
        if len(texts) > 256:
            raise bad_request("at most 256 texts per request", "input")
        return ClassifyJob(texts=texts)


def _architectures(folder: Path) -> list[str]:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return list(cfg.get("architectures") or [])


def _is_classifier_arch(folder: Path) -> bool:
    return any("SequenceClassification" in a or a == "GPT2Classifier" for a in _architectures(folder))


def is_classifier(path: str | Path) -> bool:
    """A classification run: its model/ (or the folder) is a GPT-2 classifier, or its adapter/ sits on one."""
    p = Path(path)
    if (p / "model" / "config.json").is_file() or (p / "config.json").is_file():
        return _is_classifier_arch(p / "model") or _is_classifier_arch(p)
    from gpt2tune.method.io import adapter_folder, base_folder, read_rebuild

    ad = adapter_folder(p)
    if ad is None:
        return False
    info = read_rebuild(ad)
    base = (info.get("base") or {}).get("folder")
    if base:
        return _is_classifier_arch((ad / base).resolve())
    try:
        return _is_classifier_arch(base_folder(ad, info))
    except UserError:
        return False


def _chat_template(path: Path):
    """gpt2tune's chat template of a run (chat.json), or None (any other Hugging Face chat model)."""
    from gpt2tune.chat.template import load_template
    from gpt2tune.method.io import model_folder

    try:
        folders = [model_folder(path), path]
    except UserError:
        folders = [path]
    for folder in folders:
        t = load_template(folder) if Path(folder).is_dir() else None
        if t is not None:
            return t
    return None


def _forms_ok(model, tok) -> bool:
    from gpt2tune.generate.forms import char_vocab
    from gpt2tune.generate.text import model_vocab

    try:
        char_vocab(tok, model_vocab(model, tok))
    except UserError:
        return False
    return True


def load_engine(path: str | Path, name: Optional[str] = None, max_tokens_cap: int = 256,
                weights: str = "model") -> Engine:
    """Load RUN for serving; UserError when it cannot be loaded."""
    if max_tokens_cap < 1:
        raise UserError("--max-tokens-cap must be at least 1")
    p = Path(path)
    name = name or (p.resolve().name if p.exists() else str(path))
    if is_classifier(p):
        from gpt2tune.classify.predict import id2label_of, load_classifier
        from gpt2tune.model.tokenizer import framing_of

        model, tok = load_classifier(p)
        labels = [v for _, v in sorted(id2label_of(model).items())]
        return Engine(model, tok, framing_of(tok), "classification", name, max_tokens_cap, labels=labels)
    from gpt2tune.method.io import load_run

    model, tok, framing = load_run(p)
    if getattr(tok, "chat_template", None):
        from gpt2tune.chat.template import end_id

        t = _chat_template(p)  # the reply ends at the template's end marker, else the tokenizer's
        return Engine(model, tok, framing, "chat", name, max_tokens_cap, template=t,
                      chat_end=end_id(t, tok, framing) if t is not None else framing.eos,
                      forms=_forms_ok(model, tok), weights=weights)
    return Engine(model, tok, framing, "causal-lm", name, max_tokens_cap, forms=_forms_ok(model, tok), weights=weights)
