"""Load test of `gpt2tune serve`: micro-batched against one-at-a-time serving.

    .venv/bin/python bench/load_serve.py [RUN] [--clients 64] [--requests 500] [--max-tokens 32]

Starts the server twice in this process on a free 127.0.0.1 port (loopback only): once with
`--max-batch 1` (one request at a time) and once micro-batched (`--max-batch`, default 16).
Each time `--clients` concurrent clients send `--requests` completions in all (sampling,
`max_tokens` tokens each) and stop. Prints p50/p95 latency, throughput, the status codes
(anything 5xx but 503 is a failure: exit 1) and the throughput ratio, e.g. `2.10x`.

RUN defaults to ../shared/models/gpt2-tang-mini when present, else a tiny scratch model.
`load_test(url, ...)` is the client side alone (the test suite runs a small one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODEL = ROOT.parent / "shared" / "models" / "gpt2-tang-mini"
PROMPTS = ["白日", "床前明月", "春眠不覺曉", "千山", "孤舟蓑笠", "夜來風雨", "黃河", "舉頭望"]


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def load_test(url: str, clients: int = 64, requests: int = 500, max_tokens: int = 32, timeout: float = 120.0,
              api_key: str | None = None) -> dict:
    """`clients` concurrent clients send `requests` completions in all to `url` (loopback only).

    Returns {"requests", "ok", "status": {code: count}, "errors" (transport errors), "bad_5xx"
    (5xx other than 503), "p50_s", "p95_s" (latency of successful requests), "seconds",
    "requests_per_s", "tokens_per_s" (completion tokens of successful requests)}."""
    import httpx

    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"load_serve only targets loopback servers, not {host}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def run() -> dict:
        status: Counter = Counter()
        latencies: list[float] = []
        tokens = 0
        errors = 0
        counter = iter(range(requests))
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers=headers) as http:
            async def client() -> None:
                nonlocal tokens, errors
                for i in counter:
                    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 1.0,
                            "top_p": 0.95}
                    t0 = time.perf_counter()
                    try:
                        r = await http.post("/v1/completions", json=body)
                    except httpx.HTTPError:
                        errors += 1
                        continue
                    status[str(r.status_code)] += 1
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                        tokens += r.json()["usage"]["completion_tokens"]

            t0 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(clients)))
            seconds = time.perf_counter() - t0
        ok = status.get("200", 0)
        bad = sum(n for code, n in status.items() if code.startswith("5") and code != "503")
        return {"requests": requests, "ok": ok, "status": dict(status), "errors": errors, "bad_5xx": bad,
                "p50_s": round(_percentile(latencies, 50), 4), "p95_s": round(_percentile(latencies, 95), 4),
                "seconds": round(seconds, 3), "requests_per_s": round(ok / seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1)}

    return asyncio.run(run())


def _default_run(tmp: Path) -> Path:
    if (SHARED_MODEL / "config.json").is_file():
        return SHARED_MODEL
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import ZH_TEXT

    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import build_tokenizer, framing_of, load_tokenizer

    build_tokenizer(ZH_TEXT * 3, tmp / "tok")
    tok = load_tokenizer(tmp / "tok")
    model = build_scratch("nano", len(tok), framing_of(tok), n_positions=128, seed=0)
    model.save_pretrained(str(tmp / "model"))
    tok.save_pretrained(str(tmp / "model"))
    return tmp / "model"


def _serve_and_load(engine, max_batch: int, a) -> dict:
    from gpt2tune.serve.app import create_app
    from gpt2tune.serve.server import BackgroundServer

    app = create_app(engine, max_batch=max_batch, queue_size=a.queue_size, timeout=a.timeout)
    with BackgroundServer(app) as srv:
        rep = load_test(srv.url, a.clients, a.requests, a.max_tokens, a.timeout + 30)
        rep["batches"] = app.state.batcher.stats["batches"]
        rep["mean_batch_rows"] = round(app.state.batcher.stats["rows"] / max(1, rep["batches"]), 2)
    return rep


def _line(name: str, r: dict) -> str:
    codes = ", ".join(f"{k}: {v}" for k, v in sorted(r["status"].items()))
    return (f"{name:<28} {r['ok']}/{r['requests']} ok ({codes}; transport errors {r['errors']}) | "
            f"p50 {r['p50_s']:.3f}s p95 {r['p95_s']:.3f}s | {r['requests_per_s']} req/s, {r['tokens_per_s']} tok/s | "
            f"{r['batches']} batches of {r['mean_batch_rows']} rows")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", help="run or model folder (default: ../shared gpt2-tang-mini or a tiny model)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16, help="rows per micro-batch in the batched run")
    ap.add_argument("--queue-size", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--json", action="store_true", help="print the two reports as JSON too")
    a = ap.parse_args(argv)
    if not (1 <= a.clients <= 256 and 1 <= a.requests <= 5000):
        raise SystemExit("--clients must be in 1..256 and --requests in 1..5000")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from gpt2tune.serve.engine import load_engine

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(a.run) if a.run else _default_run(Path(tmp))
        engine = load_engine(run, max_tokens_cap=max(a.max_tokens, 1))
        print(f"model {run} ({engine.task}); {a.clients} clients, {a.requests} requests, max_tokens {a.max_tokens}, "
              f"queue {a.queue_size}, torch threads {__import__('torch').get_num_threads()}", flush=True)
        serial = _serve_and_load(engine, 1, a)
        print(_line("one-at-a-time (max-batch 1)", serial), flush=True)
        batched = _serve_and_load(engine, a.max_batch, a)
        print(_line(f"micro-batched (max-batch {a.max_batch})", batched), flush=True)
    ratio = batched["tokens_per_s"] / max(serial["tokens_per_s"], 1e-9)
    print(f"micro-batching throughput vs one-at-a-time: {ratio:.2f}x")
    if a.json:
        print(json.dumps({"one_at_a_time": serial, "micro_batched": batched, "ratio": round(ratio, 3)}))
    bad = serial["bad_5xx"] + batched["bad_5xx"] + serial["errors"] + batched["errors"]
    if bad:
        print(f"FAIL: {bad} responses were 5xx other than 503 or transport errors", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
