"""Micro-batching: one worker thread owns the model and decodes requests that arrive together
as one batch.

Requests become jobs (`GenJob`, `ClassifyJob`) in a bounded queue; `submit` raises a 503
`APIError` (with Retry-After) when it is full. The worker takes the first waiting job, waits up
to `wait_ms` for more until `max_batch` rows are collected, then runs them:
- generation jobs with the same end marker and verse form share one `generate.decode.Decoder`
  over all their prompts (left-padded, one forward pass per step for the whole batch); each job
  keeps its own sampling settings (greedy, temperature, top-p, top-k, repetition penalty: per-row
  in the decoder), `max_tokens` and stop strings (rows are ended from outside with
  `Decoder.finish`), and a job is answered as soon as its own rows are done. A job with a `seed` is decoded alone, so the
  same seed gives the same text whatever else the server is doing.
- classification jobs are classified in one `classify.predict` call.

Events go back to each job's `Sink` (an asyncio queue of the HTTP handler, fed thread-safely):
`("delta", choice_index, text)`, `("done", choices, usage)` or `("error", APIError)`.
A cancelled job (timeout, client gone) is skipped, or its rows are ended at the next step;
`stats` counts the tokens decoded and the jobs dropped so. Text goes out through `generate.detok.StopStream`
over a `TextStream` (never a partial character, never a stop string).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from gpt2tune.errors import UserError
from gpt2tune.generate.sampling import Sampling
from gpt2tune.serve.schemas import APIError

log = logging.getLogger("gpt2tune.serve")


class Sink:
    """A job's events, put by the worker thread and awaited by the HTTP handler."""

    def __init__(self, loop: Optional[asyncio.AbstractEventLoop] = None):
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def get(self, timeout: float) -> tuple:
        return await asyncio.wait_for(self.queue.get(), max(timeout, 0.001))


@dataclass(eq=False)
class Job:
    sink: Optional[Sink] = field(default=None, repr=False)
    cancelled: bool = False
    started: bool = False

    @property
    def rows(self) -> int:
        return 1

    def emit(self, event: tuple) -> None:
        if self.sink is not None and not self.cancelled:
            self.sink.put(event)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class GenJob(Job):
    prompts: list = field(default_factory=list)
    heads: list = field(default_factory=list)  # each prompt as its text starts (verse forms restore punctuation)
    ids: list = field(default_factory=list)  # prompt ids (begin marker included)
    n: int = 1
    max_tokens: int = 16
    sampling: Sampling = field(default_factory=Sampling)
    eos: Optional[int] = None
    form: object = None  # a generate.constraints.ConstraintSpec (verse forms: FormSpec), hashable
    echo: bool = False
    lstrip: bool = False  # chat: the template's leading space is not part of the answer

    @property
    def rows(self) -> int:
        return len(self.ids) * self.n

    @property
    def width(self) -> int:
        return max(len(i) for i in self.ids)

    def key(self) -> tuple:
        """Jobs with equal keys share a batch: same end marker and constraint spec (sampling settings
        may differ: each row keeps its own); a seeded job is alone."""
        return (self.eos, self.form) + ((id(self),) if self.sampling.seed is not None else ())

    def settings(self) -> tuple:
        s = self.sampling
        return (s.greedy, s.temperature, s.top_p, s.top_k, s.repetition_penalty)


@dataclass(eq=False)
class ClassifyJob(Job):
    texts: list = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.texts)


@dataclass
class _Row:
    job: GenJob
    choice: int
    prompt: int
    out: object  # generate.detok.StopStream over a TextStream
    done: bool = False
    finish: str = "length"


class Batcher:
    """The bounded queue and the worker thread; see the module docstring."""

    def __init__(self, engine, max_batch: int = 16, queue_size: int = 64, wait_ms: float = 5.0):
        if max_batch < 1 or queue_size < 1 or wait_ms < 0:
            raise UserError("--max-batch and --queue-size must be at least 1, --batch-wait-ms at least 0")
        self.engine = engine
        self.max_batch, self.queue_size, self.wait = max_batch, queue_size, wait_ms / 1000.0
        self._pending: deque = deque()
        self._cv = threading.Condition()
        self._paused = False
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.stats = {"batches": 0, "jobs": 0, "rows": 0, "max_rows": 0, "rejected": 0, "tokens": 0, "cancelled": 0}

    # -- control --------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="gpt2tune-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while self._pending:
            self._pending.popleft().emit(("error", APIError(503, "the server is shutting down", "server_error",
                                                            None, "shutting_down")))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def pause(self) -> None:
        """Stop taking jobs from the queue (they wait there) until `resume`."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self._pending) >= self.queue_size:
                self.stats["rejected"] += 1
                raise APIError(503, f"the server is busy ({self.queue_size} requests waiting); retry shortly",
                               "server_error", None, "queue_full", {"Retry-After": "1"})
            self._pending.append(job)
            self._cv.notify()

    # -- the worker -----------------------------------------------------------
    def _take(self, block_until: Optional[float]) -> Optional[Job]:
        """The next waiting job that is not cancelled (waiting until `block_until`, or forever if None)."""
        with self._cv:
            while True:
                while self._pending and not self._paused:
                    job = self._pending.popleft()
                    if not job.cancelled:
                        return job
                    self.stats["cancelled"] += 1
                if self._stopping:
                    return None
                left = None if block_until is None else block_until - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cv.wait(0.1 if left is None else min(left, 0.1))

    def _loop(self) -> None:
        while not self._stopping:
            first = self._take(None)
            if first is None:
                continue
            jobs, rows = [first], first.rows
            deadline = time.monotonic() + self.wait
            while rows < self.max_batch:
                job = self._take(deadline)
                if job is None:
                    break
                jobs.append(job)
                rows += job.rows
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        texts = [j for j in jobs if isinstance(j, ClassifyJob)]
        if texts:
            self._guard(texts, self._classify)
        groups: dict = {}
        for j in jobs:
            if isinstance(j, GenJob):
                groups.setdefault(j.key(), []).append(j)
        ctx = self.engine.context
        for group in groups.values():
            batch: list[GenJob] = []
            for j in group:
                trial = batch + [j]
                fits = (sum(x.rows for x in trial) <= self.max_batch
                        and max(x.width for x in trial) + max(x.max_tokens for x in trial) <= ctx)
                if batch and not fits:
                    self._guard(batch, self._decode)
                    batch = [j]
                else:
                    batch = trial
            if batch:
                self._guard(batch, self._decode)

    def _guard(self, jobs: list, fn) -> None:
        self.stats["cancelled"] += sum(j.cancelled for j in jobs)
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            return
        for j in jobs:
            j.started = True
        self.stats["batches"] += 1
        self.stats["jobs"] += len(jobs)
        rows = sum(j.rows for j in jobs)
        self.stats["rows"] += rows
        self.stats["max_rows"] = max(self.stats["max_rows"], rows)
        try:
            fn(jobs)
        except UserError as err:
            for j in jobs:
                j.emit(("error", APIError(400, str(err))))
        except Exception as err:  # noqa: BLE001 - the worker must survive anything
            log.exception("batch of %d request(s) failed", len(jobs))
            for j in jobs:
                j.emit(("error", APIError(500, f"internal error: {type(err).__name__}: {err}", "server_error")))

    def _classify(self, jobs: list[ClassifyJob]) -> None:
        from gpt2tune.classify.predict import predict

        eng = self.engine
        texts = [t for j in jobs for t in j.texts]
        with eng.tok_lock:
            out = predict(eng.model, eng.tok, texts, batch_size=max(1, self.max_batch))
        k = 0
        for j in jobs:
            got = out[k:k + len(j.texts)]
            k += len(j.texts)
            j.emit(("done", got, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}))

    def _decode(self, jobs: list[GenJob]) -> None:
        from gpt2tune.generate.decode import Decoder
        from gpt2tune.generate.text import Prepared, suppressed_ids
        from gpt2tune.generate.detok import StopStream, TextStream

        eng = self.engine
        model, tok = eng.model, eng.tok
        rows: list[_Row] = []
        ids: list[list[int]] = []
        for j in jobs:
            for p, prompt_ids in enumerate(j.ids):
                for k in range(j.n):
                    rows.append(_Row(j, p * j.n + k, p, StopStream(TextStream(tok), j.sampling.stop, lstrip=j.lstrip)))
                    ids.append(prompt_ids)
        lead = jobs[0]
        s = dataclasses.replace(lead.sampling, max_new_tokens=max(j.max_tokens for j in jobs), num_return_sequences=1,
                                stop=[], min_new_tokens=0, num_beams=1)
        constraint = None
        if lead.form is not None:
            with eng.tok_lock:
                prep = Prepared(model, tok, eng.framing, [r.job.prompts[r.prompt] for r in rows], lead.form)
            constraint, ids = prep.constraint, prep.ids
        per_row = None  # jobs asking for different sampling settings: each row keeps its own
        if len({j.settings() for j in jobs}) > 1:
            per_row = [r.job.sampling for r in rows]
        try:
            dec = Decoder(model, ids, lead.eos, s, suppressed_ids(tok, model), constraint, eng.framing.pad,
                          per_row=per_row)
        except ValueError as err:
            raise UserError(str(err)) from None
        left = {j: j.rows for j in jobs}
        texts = [""] * len(rows)

        def close(i: int, finish: str) -> None:
            r = rows[i]
            r.done, r.finish = True, finish
            rest = r.out.flush(r.out.stream.final(dec.results[i].ids))
            texts[i] = r.out.shown
            if rest:
                r.job.emit(("delta", r.choice, rest))
            left[r.job] -= 1
            if left[r.job] == 0:
                self._answer(r.job, [(rows[x], texts[x], dec.results[x]) for x in range(len(rows))
                                     if rows[x].job is r.job])

        gone: set = set()
        for ev in dec:
            self.stats["tokens"] += len(ev.rows)
            for i, t in zip(ev.rows, ev.tokens):
                r = rows[i]
                if r.done:
                    continue
                if r.job.cancelled:  # the client left (or timed out): drop the row at the next step
                    dec.finish(i, "length")
                    r.done = True
                    if r.job not in gone:
                        gone.add(r.job)
                        self.stats["cancelled"] += 1
                    continue
                if i in ev.finished:
                    close(i, "stop")
                    continue
                delta, hit = r.out.push(t)
                if delta:
                    r.job.emit(("delta", r.choice, delta))
                if hit:
                    dec.finish(i, "stop")
                    close(i, "stop")
                elif len(dec.results[i].ids) >= r.job.max_tokens:
                    dec.finish(i, "length")
                    close(i, "length")
        for i, r in enumerate(rows):
            if not r.done and not r.job.cancelled:
                close(i, "stop" if dec.results[i].finish in ("eos", "stop") else "length")

    @staticmethod
    def _answer(job: GenJob, rows: list) -> None:
        choices = []
        completion_tokens = 0
        for r, text, res in sorted(rows, key=lambda x: x[0].choice):
            tokens = len(res.ids) + (res.finish == "eos")
            completion_tokens += tokens
            choices.append({"index": r.choice, "text": text, "finish_reason": r.finish, "tokens": tokens,
                            "head": job.heads[r.prompt]})
        prompt_tokens = sum(len(i) for i in job.ids)
        job.emit(("done", choices, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                    "total_tokens": prompt_tokens + completion_tokens}))
