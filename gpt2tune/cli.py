"""The `gpt2tune` command line: a thin layer over the tasks and tools.

User errors print one line and exit with code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from gpt2tune import __version__
from gpt2tune.errors import UserError

EPILOG = "Docs: README.md. Recipes: recipes/*.yaml. Exit codes: 0 ok, 2 user error, 130 interrupted."


def _add_train(sub):
    p = sub.add_parser("train", help="fine-tune a model as a recipe describes",
                       description="Train a model from a YAML recipe. The run folder (output.dir) receives "
                                   "recipe.yaml, model/, checkpoints/, metrics.jsonl, plots/ and eval.json.",
                       epilog="Example: gpt2tune train recipes/quickstart.yaml --set train.max_steps=200")
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any recipe field, e.g. --set train.lr=3e-5 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in output.dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_generate(sub):
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
    p.add_argument("--json", action="store_true", help="print a JSON list of samples")


def _add_data(sub):
    p = sub.add_parser("data", help="look at data before training")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    q = dsub.add_parser("inspect", help="counts, token length percentiles, truncation, examples",
                        description="Inspect a data source (KIND:PATH) as training would see it.",
                        epilog="Example: gpt2tune data inspect chinese-poetry:../shared/data/chinese-poetry/全唐诗")
    q.add_argument("spec", metavar="SPEC", help="KIND:PATH, e.g. text:notes.txt, jsonl:data.jsonl, builtin:tang-lvshi")
    q.add_argument("--field", default="text", help="jsonl field / csv column with the text")
    q.add_argument("--tokenizer", default="from-data", help="tokenizer folder or model, or from-data (default)")
    q.add_argument("--max-length", type=int, default=128)
    q.add_argument("--form", default=None, help="chinese-poetry: keep one verse form")
    q.add_argument("--simplified", action="store_true", help="chinese-poetry: convert to simplified characters")
    q.add_argument("-n", type=int, default=3, help="examples to show")
    q.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpt2tune", description="Fine-tune GPT-2-family models and use them.",
                                 epilog=EPILOG)
    ap.add_argument("--version", action="version", version=f"gpt2tune {__version__}")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_generate(sub)
    _add_data(sub)
    return ap


# ---------------------------------------------------------------------------


def cmd_train(a) -> int:
    from gpt2tune.recipe import load_recipe
    from gpt2tune.tasks import causal_lm

    recipe = load_recipe(a.recipe, a.overrides)
    causal_lm.run(recipe, resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress)
    return 0


def cmd_generate(a) -> int:
    import time

    from gpt2tune.generate.sampling import Sampling
    from gpt2tune.generate.text import complete, load_for_inference

    if a.num_return_sequences < 1 or a.max_new_tokens < 1:
        raise UserError("--num-return-sequences and --max-new-tokens must be at least 1")
    if a.temperature <= 0 or not 0 < a.top_p <= 1:
        raise UserError("--temperature must be > 0 and --top-p in (0, 1]")
    model, tok, framing = load_for_inference(a.model)
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


def cmd_data(a) -> int:
    from gpt2tune.data.inspect import format_report, inspect_texts
    from gpt2tune.data.clean import clean_all
    from gpt2tune.data import sources
    from gpt2tune.model.tokenizer import build_tokenizer, framing_of, load_tokenizer
    from gpt2tune.generate.text import model_folder

    opts = sources.SourceOptions(field=a.field, poetry_form=a.form, poetry_simplified=a.simplified)
    loaded = sources.load_source(a.spec, opts)
    texts = sources.texts_of(loaded, a.field, a.spec)
    texts, stats = clean_all(texts)
    stats["skipped_records"] = loaded.skipped
    if not texts:
        raise UserError(f"{a.spec}: no usable samples")
    if a.tokenizer == "from-data":
        with tempfile.TemporaryDirectory() as tmp:
            tok = build_tokenizer(texts, tmp)
    elif Path(a.tokenizer).is_dir() and not (Path(a.tokenizer) / "config.json").exists() \
            and not (Path(a.tokenizer) / "model").exists():
        tok = load_tokenizer(a.tokenizer)
    else:
        tok = load_tokenizer(model_folder(a.tokenizer))
    fr = framing_of(tok)
    report = inspect_texts(texts, stats, tok, fr.bos, fr.eos, a.max_length, a.n)
    if a.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print(format_report(a.spec, report))
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "data": cmd_data}


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[a.command](a)
    except UserError as err:
        if a.debug:
            raise
        print(f"gpt2tune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpt2tune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - TrainingInterrupted and friends
        from gpt2tune.train.loop import TrainingInterrupted

        if isinstance(err, TrainingInterrupted):
            print(f"gpt2tune: {err}", file=sys.stderr)
            return 130
        raise
