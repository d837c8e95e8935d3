"""`gpt2tune generate RUN_OR_MODEL`."""

from __future__ import annotations

import json
import sys
import time

from gpt2tune.errors import UserError

NAME = "generate"


def add_parser(sub):
    p = sub.add_parser("generate", help="generate text from a run or a model",
                       description="Generate from RUN (a run folder; means RUN/model) or a model folder / hub id.",
                       epilog="Example: gpt2tune generate runs/quickstart --prompt 白日 --num-return-sequences 3")
    p.add_argument("model", metavar="RUN_OR_MODEL")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, start a new sample)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--num-return-sequences", "-n", type=int, default=1)
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--json", action="store_true", help="print a JSON list of samples, each with 'text'")


def run(a) -> int:
    from gpt2tune.generate.sampling import Sampling
    from gpt2tune.generate.text import complete
    from gpt2tune.method.io import load_run

    if a.num_return_sequences < 1 or a.max_new_tokens < 1:
        raise UserError("--num-return-sequences and --max-new-tokens must be at least 1")
    if a.temperature <= 0 or not 0 < a.top_p <= 1:
        raise UserError("--temperature must be > 0 and --top-p in (0, 1]")
    model, tok, framing = load_run(a.model)
    s = Sampling(max_new_tokens=a.max_new_tokens, greedy=a.greedy, temperature=a.temperature, top_k=a.top_k,
                 top_p=a.top_p, num_return_sequences=a.num_return_sequences, seed=a.seed)
    t0 = time.perf_counter()
    texts = complete(model, tok, framing, a.prompt, s)
    dt = time.perf_counter() - t0
    if a.json:
        print(json.dumps([{"prompt": a.prompt, "text": t} for t in texts], ensure_ascii=False))
    else:
        for t in texts:
            print(t)
        print(f"({dt:.2f}s)", file=sys.stderr)
    return 0
