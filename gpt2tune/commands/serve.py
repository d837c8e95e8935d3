"""`gpt2tune serve RUN`: an OpenAI-compatible HTTP API and a web playground for a run."""

from __future__ import annotations

import os
import sys

from gpt2tune.errors import UserError

NAME = "serve"


def add_parser(sub):
    p = sub.add_parser("serve", help="serve a run over an OpenAI-compatible HTTP API with a web playground",
                       description="Serve RUN (a run folder, model folder or classifier run): /v1/completions, "
                                   "/v1/chat/completions (chat runs), /v1/classify (classifier runs), /v1/models, "
                                   "/health, and a playground page at /. Needs the 'serve' extra "
                                   "(pip install -e '.[serve]').",
                       epilog="Example: gpt2tune serve runs/quickstart --port 8000, then "
                              "curl localhost:8000/v1/completions -d '{\"prompt\": \"白日\", \"max_tokens\": 32}' "
                              "-H 'Content-Type: application/json'")
    p.add_argument("model", metavar="RUN")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint (default: env GPT2TUNE_API_KEY)")
    p.add_argument("--name", default=None, help="model id clients use (default: the run folder's name)")
    p.add_argument("--max-tokens-cap", type=int, default=256, help="largest max_tokens a request may ask for")
    p.add_argument("--max-batch", type=int, default=16,
                   help="rows (prompts x n) decoded together in one micro-batch (1: one request at a time)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long the worker waits for more requests to join a batch")
    p.add_argument("--queue-size", type=int, default=64, help="requests waiting beyond this get 503 + Retry-After")
    from gpt2tune.commands.generate import add_weights_arg

    add_weights_arg(p)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait and run before a 503")


def run(a) -> int:
    try:
        from gpt2tune.serve.app import create_app
        from gpt2tune.serve.server import serve
    except ImportError as err:
        raise UserError(f"serving needs the 'serve' extra: pip install -e '.[serve]' ({err})") from None
    from gpt2tune.serve.engine import load_engine

    if not 0 < a.port < 65536:
        raise UserError("--port must be between 1 and 65535")
    if a.timeout <= 0:
        raise UserError("--timeout must be > 0")
    if a.max_batch < 1 or a.queue_size < 1 or a.batch_wait_ms < 0:
        raise UserError("--max-batch and --queue-size must be at least 1, --batch-wait-ms at least 0")
    key = a.api_key or os.environ.get("GPT2TUNE_API_KEY") or None
    engine = load_engine(a.model, a.name, a.max_tokens_cap, a.weights)
    if a.weights != "model":
        from gpt2tune.commands.generate import check_weights

        if engine.task == "classification":
            raise UserError("--weights applies to text generation; classifiers run with their own weights")
        check_weights(engine.model, engine.tok, engine.framing, a.weights)
    app = create_app(engine, max_batch=a.max_batch, queue_size=a.queue_size, timeout=a.timeout, api_key=key,
                     wait_ms=a.batch_wait_ms)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not key:
        print(f"gpt2tune: warning: serving on {a.host} without an API key (--api-key)", file=sys.stderr)
    print(f"serving {engine.name} ({engine.task}) on http://{a.host}:{a.port}/ "
          f"(API: http://{a.host}:{a.port}/v1){' with an API key' if key else ''}", file=sys.stderr, flush=True)
    serve(app, a.host, a.port)
    return 0
