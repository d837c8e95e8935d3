"""The FastAPI application: OpenAI-shaped endpoints over one loaded run.

    GET  /                      the playground (static/index.html)
    GET  /health                200 {"status": "ok", ...} once the model is loaded and the worker runs
    GET  /v1/models             the served model (OpenAI list shape; `task` etc. as extensions)
    POST /v1/completions        text completion (prompt or list; n, stop, seed, stream; verse forms)
    POST /v1/chat/completions   chat runs (the tokenizer's chat template)
    POST /v1/classify           classifier runs: {"input": str | [str]} -> labels and probabilities

Streams are server-sent events (`data: {chunk}` ... `data: [DONE]`). Errors are
`{"error": {"message", "type", "param", "code"}}` with a 4xx status (5xx only for overload,
503 with Retry-After, or a bug). With an API key every endpoint but the static playground page
wants `Authorization: Bearer KEY` (the page asks for the key).

The event loop only moves bytes: a body over `Limits.body_bytes` is refused (413) before it is
parsed, other limits are checked on lengths, and tokenizing runs in a worker thread, so a big
request never holds up the others (or /health). A client that goes away (streaming or not) has
its job cancelled: the batching worker drops its rows at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt2tune.serve.batching import Batcher, GenJob, Sink
from gpt2tune.serve.schemas import APIError, ChatRequest, ClassifyRequest, CompletionRequest, Limits, error_body

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = {"/", "/index.html"}


def _validation_message(err: RequestValidationError) -> tuple[str, Optional[str]]:
    errors = err.errors()
    if not errors:
        return "invalid request body", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
    if e.get("type") == "extra_forbidden":
        msg = "unknown field"
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"{param}: {msg}" if param else msg) + more, param


def _sse(obj) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")


DRAIN_BYTES = 16 * 1024 * 1024  # an over-long body is read (and dropped) up to this, so the client sees the 413


class _Gate:
    """ASGI middleware in front of every request: the API key, then the body size limit. The body
    is read here (at most `max_body` bytes kept) and handed on; after it the app's `receive` is the
    server's own, where a client leaving shows as `http.disconnect`."""

    def __init__(self, app, api_key: Optional[str], max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope["path"] not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return await JSONResponse(error_body("Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                                                     "invalid_request_error", None, "invalid_api_key"), status_code=401,
                                          headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        declared = headers.get("content-length", "")
        size, chunks, more = 0, [], True
        if not (declared.isdigit() and int(declared) > self.max_body):
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                body, more = msg.get("body", b""), msg.get("more_body", False)
                size += len(body)
                if size > self.max_body:
                    break
                chunks.append(body)
        if size > self.max_body or more:
            while more and size <= DRAIN_BYTES:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                size += len(msg.get("body", b""))
                more = msg.get("more_body", False)
            return await JSONResponse(error_body(f"the request body is larger than this server's limit of "
                                                 f"{self.max_body} bytes", "invalid_request_error", None,
                                                 "request_too_large"), status_code=413)(scope, receive, send)
        body, handed = b"".join(chunks), False

        async def replay():
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(engine, max_batch: int = 16, queue_size: int = 64, timeout: float = 60.0,
               api_key: Optional[str] = None, wait_ms: float = 5.0, limits: Optional[Limits] = None) -> FastAPI:
    """The application for a loaded `engine` (see `serve.engine.load_engine`). The batching worker
    starts and stops with the application (its lifespan). `limits`: request size limits (default:
    `Limits.from_env()`)."""
    limits = limits if limits is not None else Limits.from_env()
    batcher = Batcher(engine, max_batch=max_batch, queue_size=queue_size, wait_ms=wait_ms)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="gpt2tune", summary=f"OpenAI-compatible API for {engine.name}", lifespan=lifespan)
    app.state.engine, app.state.batcher, app.state.timeout, app.state.limits = engine, batcher, timeout, limits
    app.add_middleware(_Gate, api_key=api_key, max_body=limits.body_bytes)

    # -- errors and the API key ------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        msg, param = _validation_message(err)
        return JSONResponse(error_body(msg, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):
        kind = "not_found" if err.status_code == 404 else None
        return JSONResponse(error_body(str(err.detail), "invalid_request_error", None, kind),
                            status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request, err: Exception):
        return JSONResponse(error_body(f"internal error: {type(err).__name__}", "server_error"), status_code=500)

    # -- plain endpoints -------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        body = {"status": "ok" if batcher.running else "loading", "model": engine.name, "task": engine.task,
                "waiting": batcher.waiting, "queue_size": batcher.queue_size, "max_batch": batcher.max_batch,
                "stats": dict(batcher.stats)}
        return JSONResponse(body, status_code=200 if batcher.running else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [engine.info()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        engine.check_model(model_id)
        return engine.info()

    # -- generation ------------------------------------------------------------
    async def make_job(fn, req):
        """`fn(req)` (validation and tokenizing) in a worker thread, after the cheap size limits."""
        limits.check(req)
        return await run_in_threadpool(fn, req)

    async def watch_client(request: Request, job) -> None:
        """Wait for the client to go away; then cancel `job` and wake its handler."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()
        job.sink.queue.put_nowait(("gone",))

    async def run_job(job, request: Request, stream_first: bool = False):
        """Submit `job`; return the events up to "done" (or, with stream_first, the first event) and
        the task watching for the client to leave (already stopped unless stream_first)."""
        job.sink = Sink(asyncio.get_running_loop())
        job.deadline = time.monotonic() + timeout
        batcher.submit(job)
        watch = asyncio.ensure_future(watch_client(request, job))
        events = []
        try:
            while True:
                ev = await next_event(job)
                if ev[0] == "error":
                    raise ev[1]
                if ev[0] == "gone":
                    raise APIError(499, "the client closed the request", code="client_closed")
                events.append(ev)
                if stream_first or ev[0] == "done":
                    break
        except BaseException:
            watch.cancel()
            raise
        if not stream_first:
            watch.cancel()
        return events, watch

    async def next_event(job):
        try:
            return await job.sink.get(job.deadline - time.monotonic())
        except asyncio.TimeoutError:
            job.cancel()
            where = "running" if job.started else "waiting in the queue"
            raise APIError(503, f"the request timed out after {timeout:g}s ({where})", "server_error", None,
                           "timeout", {"Retry-After": "1"}) from None

    def stream_response(job, started, chunk, final):
        first, watch = started

        async def body():
            try:
                pending = list(first)
                while True:
                    ev = pending.pop(0) if pending else await next_event(job)
                    if ev[0] == "gone":
                        return
                    if ev[0] == "error":
                        raise ev[1]
                    if ev[0] == "delta":
                        yield _sse(chunk(ev[1], ev[2]))
                        continue
                    for piece in final(ev[1], ev[2]):
                        yield _sse(piece)
                    yield _sse("[DONE]")
                    return
            except APIError as err:
                yield _sse(err.body())
                yield _sse("[DONE]")
            finally:
                watch.cancel()
                job.cancel()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def usage_of(usage):
        return {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        job: GenJob = await make_job(engine.completion_job, req)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def obj(choices, usage=None):
            d = {"id": cid, "object": "text_completion", "created": created, "model": engine.name, "choices": choices}
            if usage is not None:
                d["usage"] = usage
            return d

        if req.stream:
            heads_sent = set()

            def chunk(i, text):
                if job.echo and i not in heads_sent:
                    heads_sent.add(i)
                    text = job.heads[i // job.n] + text
                return obj([{"text": text, "index": i, "logprobs": None, "finish_reason": None}])

            def final(choices, usage):
                out = [obj([{"text": (c["head"] if job.echo and c["index"] not in heads_sent else ""), "index": c["index"],
                             "logprobs": None, "finish_reason": c["finish_reason"]}]) for c in choices]
                if req.stream_options and req.stream_options.include_usage:
                    out.append(obj([], usage_of(usage)))
                return out

            return stream_response(job, await run_job(job, request, stream_first=True), chunk, final)
        events, _ = await run_job(job, request)
        _, choices, usage = events[-1]
        return obj([{"text": (c["head"] if job.echo else "") + c["text"], "index": c["index"], "logprobs": None,
                     "finish_reason": c["finish_reason"]} for c in choices], usage_of(usage))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        job: GenJob = await make_job(engine.chat_job, req)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def obj(kind, choices, usage=None):
            d = {"id": cid, "object": kind, "created": created, "model": engine.name, "system_fingerprint": None,
                 "choices": choices}
            if usage is not None:
                d["usage"] = usage
            return d

        if req.stream:
            opened = set()

            def chunk(i, text):
                delta = {"content": text}
                if i not in opened:
                    opened.add(i)
                    delta["role"] = "assistant"
                return obj("chat.completion.chunk", [{"index": i, "delta": delta, "logprobs": None,
                                                      "finish_reason": None}])

            def final(choices, usage):
                out = [obj("chat.completion.chunk", [{"index": c["index"], "delta": {} if c["index"] in opened else
                                                      {"role": "assistant", "content": ""}, "logprobs": None,
                                                      "finish_reason": c["finish_reason"]}]) for c in choices]
                if req.stream_options and req.stream_options.include_usage:
                    out.append(obj("chat.completion.chunk", [], usage_of(usage)))
                return out

            return stream_response(job, await run_job(job, request, stream_first=True), chunk, final)
        events, _ = await run_job(job, request)
        _, choices, usage = events[-1]
        return obj("chat.completion", [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                                        "logprobs": None, "finish_reason": c["finish_reason"]} for c in choices],
                   usage_of(usage))

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest, request: Request):
        job = await make_job(engine.classify_job, req)
        events, _ = await run_job(job, request)
        _, results, _ = events[-1]
        return {"id": f"clf-{uuid.uuid4().hex[:24]}", "object": "classification", "model": engine.name,
                "results": [{"index": i, **r} for i, r in enumerate(results)]}

    return app
